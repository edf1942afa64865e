package main

// Socket I/O without the runtime's syscall bookkeeping.
//
// A write that wakes another process (Redis, the client) can take tens of microseconds on a
// busy or virtualised host: the woken reader is often scheduled before write(2) returns. Go
// treats a syscall that outlasts one sysmon tick (20 µs) as blocking: sysmon hands the P to
// another thread (a futex wake-up, then a second one when the first thread comes back and
// finds its P gone) and, having found work, keeps ticking every 20 µs instead of backing off
// to 10 ms. With the edge's one P (--procs 1) that cost more than the writes themselves:
// measured at concurrency 64 on the 2-core VM, sysmon alone woke ~0.8 times per call and
// took ~14 µs of CPU per call, and three other threads switched in and out for the hand-offs.
//
// The sockets are non-blocking (the runtime's netpoller owns them), so read(2) and write(2)
// never block here: they return EAGAIN and we park on the netpoller as net.Conn does. Issued
// as raw syscalls they keep the P, and the handing-off does not happen. The price is that a
// slow write holds up this P's other goroutines for its duration; with one P they could not
// have run anyway while the core was busy with the process being woken.

import (
	"io"
	"net"
	"syscall"
	"unsafe"
)

// rawConn is a net.Conn whose Read and Write are raw syscalls on its non-blocking socket.
// Deadlines, Close and addresses are the wrapped connection's.
type rawConn struct {
	net.Conn
	rc syscall.RawConn
}

// wrapConn returns c with raw-syscall I/O, or c itself when it has no file descriptor.
func wrapConn(c net.Conn) net.Conn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	return &rawConn{Conn: c, rc: rc}
}

func (c *rawConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			switch e {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // nothing to read yet: park on the netpoller, then try again
			}
			n, errno = int(r), e
			return true
		}
	})
	if err != nil {
		return 0, err // deadline passed or connection closed, as net.Conn reports them
	}
	if errno != 0 {
		return 0, &net.OpError{Op: "read", Net: c.LocalAddr().Network(), Addr: c.RemoteAddr(), Err: errno}
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

func (c *rawConn) Write(b []byte) (int, error) {
	written := 0
	var errno syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		for written < len(b) {
			r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[written])),
				uintptr(len(b)-written))
			switch e {
			case 0:
				written += int(r)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false // socket buffer full: park until writable
			default:
				errno = e
				return true
			}
		}
		return true
	})
	if err != nil {
		return written, err
	}
	if errno != 0 {
		return written, &net.OpError{Op: "write", Net: c.LocalAddr().Network(), Addr: c.RemoteAddr(), Err: errno}
	}
	return written, nil
}

// rawListener hands out connections with raw-syscall I/O.
type rawListener struct{ net.Listener }

func (l rawListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return wrapConn(c), nil
}
