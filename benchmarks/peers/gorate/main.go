// Go's golang.org/x/time/rate on the workloads of benchmarks/peers/run.sh.
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o gorate .
//
// (Debian's golang-golang-x-time-dev puts the package under
// /usr/share/gocode.) Prints CSV rows: peer,workload,ns_per_op,bytes_per_key.
// Each workload is warmed up and then timed over a fixed wall-clock span; ns
// per op is that span over the operations done (all goroutines together for
// the 2-thread workload, GOMAXPROCS=2). x/time/rate has no keyed API: one key
// is one *rate.Limiter, 100k keys are limiters in a map behind a
// sync.Mutex (the pattern of its users: a visitors map).
package main

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

const (
	warm = time.Second
	span = 2 * time.Second
)

var sink int64

func timed(op func(i int) bool, d time.Duration) float64 {
	ops, ok := 0, 0
	start := time.Now()
	var el time.Duration
	for {
		for i := 0; i < 10000; i++ {
			if op(i) {
				ok++
			}
		}
		ops += 10000
		if el = time.Since(start); el >= d {
			break
		}
	}
	sink += int64(ok)
	return float64(el.Nanoseconds()) / float64(ops)
}

func bench(op func(i int) bool) float64 {
	timed(op, warm)
	return timed(op, span)
}

func heap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func row(w string, ns float64, bytes string) {
	fmt.Printf("go-x-time-rate,%s,%.1f,%s\n", w, ns, bytes)
}

func main() {
	runtime.GOMAXPROCS(2)
	// One key, allowed: a rate no run reaches (rate.Inf would skip the
	// arithmetic, so a finite one).
	open := rate.NewLimiter(rate.Limit(1e12), 1_000_000_000)
	row("one_key_allowed", bench(func(int) bool { return open.Allow() }), "")

	// One key, denied: one event a day, taken first.
	shut := rate.NewLimiter(rate.Every(24*time.Hour), 1)
	shut.Allow()
	row("one_key_denied", bench(func(int) bool { return shut.Allow() }), "")

	// 100k keys, touched in turn.
	const n = 100000
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("user:%d", i)
	}
	var mu sync.Mutex
	before := heap()
	m := make(map[string]*rate.Limiter)
	get := func(k string) *rate.Limiter {
		mu.Lock()
		l, found := m[k]
		if !found {
			l = rate.NewLimiter(rate.Limit(1e12), 1_000_000_000)
			m[k] = l
		}
		mu.Unlock()
		return l
	}
	for _, k := range keys {
		get(k).Allow()
	}
	after := heap()
	at := 0
	ns := bench(func(int) bool {
		j := at
		if at++; at == n {
			at = 0
		}
		return get(keys[j]).Allow()
	})
	row("100k_keys", ns, fmt.Sprintf("%.1f", float64(after-before)/n))
	runtime.KeepAlive(m)

	// 2 goroutines on one key (allowed).
	hot := rate.NewLimiter(rate.Limit(1e12), 1_000_000_000)
	for _, d := range []time.Duration{warm, span} {
		var total int64
		var wg sync.WaitGroup
		start := time.Now()
		for t := 0; t < 2; t++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ops, ok := int64(0), int64(0)
				for {
					for i := 0; i < 10000; i++ {
						if hot.Allow() {
							ok++
						}
					}
					ops += 10000
					if time.Since(start) >= d {
						break
					}
				}
				atomic.AddInt64(&total, ops)
				atomic.AddInt64(&sink, ok)
			}()
		}
		wg.Wait()
		wall := time.Since(start)
		if d == span {
			row("2_threads_one_key", float64(wall.Nanoseconds())/float64(total), "")
		}
	}
}
