package main

import (
	"os"
	"strings"
	"testing"
)

func TestWindowDefaultsToFixedAndRefusesOutOfRange(t *testing.T) {
	cases := []struct {
		env  string
		args []string
		want int
		err  string
	}{
		{args: nil, want: 4 << 20},
		{args: []string{"--window-bytes", "0"}, want: 0},
		{args: []string{"--window-bytes", "65536"}, want: 65536},
		{env: "1048576", want: 1 << 20},
		{args: []string{"--window-bytes", "1000"}, err: "out of range"},
		{args: []string{"--window-bytes", "300000000"}, err: "out of range"},
		{env: "lots", err: "not a number"},
	}
	for _, tc := range cases {
		t.Setenv("FERRY_EDGE_WINDOW_BYTES", tc.env) // restored when the test ends
		if tc.env == "" {
			os.Unsetenv("FERRY_EDGE_WINDOW_BYTES")
		}
		c, _, err := parseConfig(tc.args)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("env %q args %q: error %v, want one saying %q", tc.env, tc.args, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("env %q args %q: %v", tc.env, tc.args, err)
		case tc.err == "" && c.window != tc.want:
			t.Errorf("env %q args %q: window %d, want %d", tc.env, tc.args, c.window, tc.want)
		}
	}
}
