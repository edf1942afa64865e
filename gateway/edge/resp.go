package main

// A minimal RESP2 client: one connection, whole pipelines written at once and their
// replies read in order. Each connection belongs to one goroutine (the submitter, the
// listener, the control loop), so there is no locking here.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// RespError is an error reply from Redis (for example NOSCRIPT or OOM): the command
// failed, the connection is fine.
type RespError string

func (e RespError) Error() string { return string(e) }

// redisTarget is a parsed Redis URL: what the edge supports of Ferry's URL forms.
type redisTarget struct {
	network, address string
	user, password   string
	db               int
	display          string // the URL without its password, for logs and messages
}

// parseRedisURL accepts redis://[user:password@]host:port[/db] and unix:///path[?db=N].
// TLS (rediss://), Sentinel and Cluster URLs are refused with the reason: the Python
// gateway speaks them, the edge does not (yet).
func parseRedisURL(raw string) (redisTarget, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return redisTarget{}, fmt.Errorf("redis url %q does not parse: %v", raw, err)
	}
	t := redisTarget{}
	if u.User != nil {
		t.user = u.User.Username()
		t.password, _ = u.User.Password()
	}
	q := u.Query()
	switch u.Scheme {
	case "redis":
		host := u.Host
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "6379")
		}
		t.network, t.address = "tcp", host
		if p := strings.Trim(u.Path, "/"); p != "" {
			if t.db, err = strconv.Atoi(p); err != nil {
				return t, fmt.Errorf("redis url: database %q is not a number", p)
			}
		}
	case "unix":
		t.network, t.address = "unix", u.Path
	default:
		return t, fmt.Errorf("the edge connects to redis:// and unix:// URLs only, not %s:// (TLS, Sentinel "+
			"and Cluster need the Python gateway: run without the edge)", u.Scheme)
	}
	if d := q.Get("db"); d != "" {
		if t.db, err = strconv.Atoi(d); err != nil {
			return t, fmt.Errorf("redis url: db=%q is not a number", d)
		}
	}
	for k := range q {
		if k != "db" {
			return t, fmt.Errorf("redis url: the edge does not know the option %q", k)
		}
	}
	shown := *u
	shown.User = nil
	t.display = shown.String()
	return t, nil
}

type respConn struct {
	c       net.Conn
	r       *bufio.Reader
	w       *bufio.Writer
	timeout time.Duration // per round trip; 0: none (blocking reads set their own)
}

func dialRedis(t redisTarget, timeout time.Duration) (*respConn, error) {
	c, err := net.DialTimeout(t.network, t.address, timeout)
	if err != nil {
		return nil, err
	}
	c = wrapConn(c)
	rc := &respConn{c: c, r: bufio.NewReaderSize(c, 1<<16), w: bufio.NewWriterSize(c, 1<<16), timeout: timeout}
	var hello [][]interface{}
	if t.password != "" {
		if t.user != "" {
			hello = append(hello, []interface{}{"AUTH", t.user, t.password})
		} else {
			hello = append(hello, []interface{}{"AUTH", t.password})
		}
	}
	if t.db != 0 {
		hello = append(hello, []interface{}{"SELECT", t.db})
	}
	if len(hello) > 0 {
		replies, err := rc.do(hello)
		if err == nil {
			for _, r := range replies {
				if e, ok := r.(RespError); ok {
					err = e
				}
			}
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("redis %s refused the connection setup: %v", t.display, err)
		}
	}
	return rc, nil
}

func (rc *respConn) close() { rc.c.Close() }

func writeArg(w *bufio.Writer, a interface{}) {
	var b []byte
	switch v := a.(type) {
	case []byte:
		b = v
	case string:
		b = []byte(v)
	case int:
		b = strconv.AppendInt(nil, int64(v), 10)
	case int64:
		b = strconv.AppendInt(nil, v, 10)
	case uint64:
		b = strconv.AppendUint(nil, v, 10)
	case float64:
		b = strconv.AppendFloat(nil, v, 'f', -1, 64)
	default:
		panic(fmt.Sprintf("resp: cannot send %T", a))
	}
	w.WriteByte('$')
	w.WriteString(strconv.Itoa(len(b)))
	w.WriteString("\r\n")
	w.Write(b)
	w.WriteString("\r\n")
}

// do sends every command in one write and reads one reply per command. Error replies
// come back as RespError values; a returned error means the connection is broken.
func (rc *respConn) do(cmds [][]interface{}) ([]interface{}, error) {
	return rc.doWithin(cmds, rc.timeout)
}

func (rc *respConn) doWithin(cmds [][]interface{}, timeout time.Duration) ([]interface{}, error) {
	if timeout > 0 {
		rc.c.SetDeadline(time.Now().Add(timeout))
	} else {
		rc.c.SetDeadline(time.Time{})
	}
	for _, cmd := range cmds {
		rc.w.WriteByte('*')
		rc.w.WriteString(strconv.Itoa(len(cmd)))
		rc.w.WriteString("\r\n")
		for _, a := range cmd {
			writeArg(rc.w, a)
		}
	}
	if err := rc.w.Flush(); err != nil {
		return nil, err
	}
	out := make([]interface{}, len(cmds))
	for i := range cmds {
		v, err := rc.read()
		if err != nil {
			return nil, err
		}
		out[i] = v
	}
	return out, nil
}

func (rc *respConn) line() ([]byte, error) {
	l, err := rc.r.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if len(l) < 3 || l[len(l)-2] != '\r' {
		return nil, errors.New("resp: malformed line")
	}
	return l[:len(l)-2], nil
}

func (rc *respConn) read() (interface{}, error) {
	l, err := rc.line()
	if err != nil {
		return nil, err
	}
	switch l[0] {
	case '+':
		return string(l[1:]), nil
	case '-':
		return RespError(string(l[1:])), nil
	case ':':
		return strconv.ParseInt(string(l[1:]), 10, 64)
	case '$', '*':
		n, err := strconv.Atoi(string(l[1:]))
		if err != nil {
			return nil, err
		}
		if n < 0 { // a null bulk string or array
			return nil, nil
		}
		if l[0] == '$' {
			b := make([]byte, n+2)
			if _, err := io.ReadFull(rc.r, b); err != nil {
				return nil, err
			}
			return b[:n], nil
		}
		arr := make([]interface{}, n)
		for i := range arr {
			if arr[i], err = rc.read(); err != nil {
				return nil, err
			}
		}
		return arr, nil
	}
	return nil, fmt.Errorf("resp: unexpected reply type %q", l[0])
}
