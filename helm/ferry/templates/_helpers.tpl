{{/* Names and labels. */}}
{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "gateway"). */}}
{{- define "ferry.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "root" $ "role" "gateway"). */}}
{{- define "ferry.image" -}}
{{- $i := .root.Values.image -}}
{{- $repo := printf "%s/%s" $i.repository .role -}}
{{- if $i.registry }}{{ $repo = printf "%s/%s" $i.registry $repo }}{{ end -}}
{{ $repo }}:{{ $i.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{- define "ferry.workerRole" -}}
{{- $roles := dict "onnx-cpu" "worker-cpu" "onnx-gpu" "worker-gpu" "neuron" "worker-neuron" -}}
{{- get $roles . -}}
{{- end -}}

{{- define "ferry.redisHost" -}}{{ include "ferry.fullname" . }}-redis{{- end -}}

{{/* Environment every Ferry container shares: (dict "root" $ "role" "gateway"|"broker"|"worker"). */}}
{{- define "ferry.env" -}}
{{- $role := .role -}}
{{- with .root -}}
- name: FERRY_REDIS_URL
{{- if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      # Each component's own key (its own least-privilege ACL user) when given, else the shared one.
      key: {{ (get .Values.redis.componentSecretKeys $role) | default .Values.redis.existingSecretKey }}
{{- else if .Values.redis.bundled }}
  value: {{ printf "redis://%s:6379/0" (include "ferry.redisHost" .) | quote }}
{{- else }}
  value: {{ required "redis.url or redis.existingSecret is needed when redis.bundled is false" .Values.redis.url | quote }}
{{- end }}
- name: FERRY_MODEL_REPOSITORY
  value: /models
- name: FERRY_LOG_JSON
  value: {{ ternary "1" "0" .Values.logJson | quote }}
- name: FERRY_GRACE_S
  value: {{ .Values.graceSeconds | quote }}
- name: FERRY_NO_WORKER_GRACE_S
  value: {{ .Values.noWorkerGraceSeconds | quote }}
{{- if .Values.tracing.otlpEndpoint }}
- name: FERRY_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
- name: FERRY_TRACE_SAMPLE_RATIO
  value: {{ .Values.tracing.sampleRatio | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Labels on every pod that talks to Redis: what the Redis NetworkPolicy admits. */}}
{{- define "ferry.redisClient" -}}
ferry.dev/redis-client: "true"
{{- end -}}

{{/* The model repository volume, and the init container that fills it when needed. */}}
{{- define "ferry.modelVolume" -}}
- name: models
{{- if eq .Values.models.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "models.pvc.claimName is needed when models.source is pvc" .Values.models.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "ferry.modelInit" -}}
{{- if eq .Values.models.source "example" }}
- name: example-model
  image: {{ include "ferry.image" (dict "root" . "role" "worker-cpu") }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["example-model", "/models"]
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: /models}
{{- else if eq .Values.models.source "image" }}
- name: model-repository
  image: {{ printf "%s:%s" (required "models.image.repository is needed when models.source is image" .Values.models.image.repository) .Values.models.image.tag }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["cp", "-R", "{{ .Values.models.image.path }}/.", "/models/"]
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: /models}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every Ferry pod: (dict "root" $ "spec" <component values>). */}}
{{- define "ferry.podSpec" -}}
{{- $root := .root -}}
terminationGracePeriodSeconds: {{ add $root.Values.graceSeconds 10 }}
securityContext: {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.schedulerName }}
schedulerName: {{ . }}
{{- end }}
{{- with .spec.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- $init := include "ferry.modelInit" $root }}
{{- if $init }}
initContainers: {{- $init | nindent 2 }}
{{- end }}
volumes: {{- include "ferry.modelVolume" $root | nindent 2 }}
{{- with .volumes }}{{ toYaml . | nindent 2 }}{{ end }}
{{- end -}}

{{- define "ferry.mounts" -}}
- {name: models, mountPath: /models, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- end -}}
