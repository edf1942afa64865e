"""The gateway: the Open Inference Protocol gRPC front end."""
