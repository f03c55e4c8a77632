// The six RabbitMQ tutorials driven with amqp091-go (Debian
// golang-github-rabbitmq-amqp091-go-dev), as automated checks.
//
// Build offline in GOPATH mode against the Debian source tree:
//
//	GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go build -o tutorials tutorials.go
//
// Run: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f ./tutorials SCENARIO
// with SCENARIO one of hello_world, work_queues, publish_subscribe, routing,
// topics, rpc, rpc_direct_reply_to.  Exits 0 on success; on failure the last
// line printed is the reason.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

var (
	url   = envOr("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
	run   = randomHex(5)
	wait  = 15 * time.Second
	grace = 400 * time.Millisecond
)

type failure string

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func fail(format string, a ...interface{}) { panic(failure(fmt.Sprintf(format, a...))) }

func check(cond bool, format string, a ...interface{}) {
	if !cond {
		fail(format, a...)
	}
}

func must(err error, what string) {
	if err != nil {
		fail("%s: %v", what, err)
	}
}

func expectEq(what string, got, want interface{}) {
	if !reflect.DeepEqual(got, want) {
		fail("%s: expected %v, got %v", what, want, got)
	}
}

func name(base string) string { return "conf." + base + "." + run }

func dial() *amqp.Connection {
	c, err := amqp.DialConfig(url, amqp.Config{Dial: amqp.DefaultDial(10 * time.Second)})
	must(err, "dial")
	return c
}

func channel(c *amqp.Connection) *amqp.Channel {
	ch, err := c.Channel()
	must(err, "channel.open")
	return ch
}

func publish(ch *amqp.Channel, exchange, key string, msg amqp.Publishing) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	must(ch.PublishWithContext(ctx, exchange, key, false, false, msg), "basic.publish")
}

func text(s string) amqp.Publishing {
	return amqp.Publishing{ContentType: "text/plain", Body: []byte(s)}
}

func waitFor(cond func() bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// sub is an auto-ack consumer recording "routingKey|body" for every delivery.
type sub struct {
	queue string
	mu    sync.Mutex
	got   []string
	body  []string
}

func newSub(c *amqp.Connection, queue, exchange string, keys ...string) *sub {
	ch := channel(c)
	if queue == "" {
		q, err := ch.QueueDeclare("", false, true, true, false, nil) // server-named, exclusive
		must(err, "queue.declare")
		queue = q.Name
	}
	for _, k := range keys {
		must(ch.QueueBind(queue, k, exchange, false, nil), "queue.bind")
	}
	ds, err := ch.Consume(queue, "", true, false, false, false, nil)
	must(err, "basic.consume")
	s := &sub{queue: queue}
	go func() {
		for d := range ds {
			s.mu.Lock()
			s.got = append(s.got, d.RoutingKey+"|"+string(d.Body))
			s.body = append(s.body, string(d.Body))
			s.mu.Unlock()
		}
	}()
	return s
}

func (s *sub) size() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.got) }
func (s *sub) snapshot() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string{}, s.got...)
}
func (s *sub) bodies() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string{}, s.body...)
}

func replyCode(err error) int {
	var e *amqp.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return -1
}

// ------------------------------------------------------------------ 1
func helloWorld() {
	q, n := name("hello"), 10
	sender, receiver := dial(), dial()
	defer sender.Close()
	defer receiver.Close()
	ch := channel(sender)
	_, err := ch.QueueDeclare(q, false, false, false, false, nil)
	must(err, "queue.declare")
	var want []string
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("Hello World! #%d", i)
		publish(ch, "", q, text(body))
		want = append(want, body)
	}
	rx := newSub(receiver, q, "")
	check(waitFor(func() bool { return rx.size() >= n }, wait), "received %d of %d", rx.size(), n)
	time.Sleep(grace)
	expectEq("bodies", rx.bodies(), want)

	for i := 0; i < 3; i++ {
		publish(ch, "", q, text(fmt.Sprintf("get #%d", i)))
	}
	check(waitFor(func() bool { return rx.size() >= n+3 }, wait), "the consumer did not get the 3 extra messages")
	// the consumer is still attached: it takes the new messages, basic.get finds nothing
	_, ok, err := ch.Get(q, true)
	must(err, "basic.get")
	check(!ok, "basic.get found a message although a consumer had taken them all")
	receiver.Close()
	for i := 0; i < 2; i++ {
		publish(ch, "", q, text(fmt.Sprintf("fetch #%d", i)))
	}
	check(waitFor(func() bool {
		st, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
		return err == nil && st.Messages >= 2
	}, wait), "message_count never reached 2")
	for i := 0; i < 2; i++ {
		m, ok, err := ch.Get(q, true)
		must(err, "basic.get")
		check(ok, "basic.get #%d returned get-empty", i)
		expectEq(fmt.Sprintf("basic.get #%d", i), string(m.Body), fmt.Sprintf("fetch #%d", i))
		expectEq(fmt.Sprintf("basic.get #%d message_count", i), m.MessageCount, uint32(1-i))
	}
	_, ok, err = ch.Get(q, true)
	must(err, "basic.get")
	check(!ok, "basic.get on drained queue did not return get-empty")
	left, err := ch.QueueDelete(q, false, false, false)
	must(err, "queue.delete")
	expectEq("queue.delete-ok message_count", left, 0)
	expectEq("consumer bodies incl. 3 extra", rx.bodies()[n:], []string{"get #0", "get #1", "get #2"})
	fmt.Printf("ok: %d+3 consumed, 2 fetched in order\n", n)
}

// ------------------------------------------------------------------ 2
func workQueues() {
	q, n := name("task_queue"), 20
	conn := dial()
	defer conn.Close()
	ch := channel(conn)
	_, err := ch.QueueDeclare(q, true, false, false, false, nil)
	must(err, "queue.declare")
	_, err = channel(conn).QueueDeclare(q, false, false, false, false, nil)
	check(err != nil, "redeclaring a durable queue as non-durable did not fail")
	expectEq("reply code for inequivalent redeclare", replyCode(err), 406)

	var mu sync.Mutex
	per := map[string][]string{}
	var problems []string
	total := 0
	for _, w := range []struct {
		label string
		delay time.Duration
	}{{"fast", 10 * time.Millisecond}, {"slow", 600 * time.Millisecond}} {
		wc := dial()
		defer wc.Close()
		wch := channel(wc)
		_, err := wch.QueueDeclare(q, true, false, false, false, nil)
		must(err, "queue.declare (worker)")
		must(wch.Qos(1, 0, false), "basic.qos")
		ds, err := wch.Consume(q, "", false, false, false, false, nil)
		must(err, "basic.consume")
		label, delay := w.label, w.delay
		go func() {
			for d := range ds {
				time.Sleep(delay)
				mu.Lock()
				per[label] = append(per[label], string(d.Body))
				total++
				if d.Redelivered {
					problems = append(problems, "redelivered "+string(d.Body))
				}
				if d.DeliveryMode != amqp.Persistent {
					problems = append(problems, fmt.Sprintf("delivery_mode %d for %s", d.DeliveryMode, d.Body))
				}
				mu.Unlock()
				if err := d.Ack(false); err != nil {
					mu.Lock()
					problems = append(problems, "ack: "+err.Error())
					mu.Unlock()
				}
			}
		}()
	}
	var want []string
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("task %d%s", i, strings.Repeat(".", i%3))
		publish(ch, "", q, amqp.Publishing{DeliveryMode: amqp.Persistent, ContentType: "text/plain", Body: []byte(body)})
		want = append(want, body)
	}
	done := waitFor(func() bool { mu.Lock(); defer mu.Unlock(); return total >= n }, wait)
	time.Sleep(grace + 600*time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	check(done, "only %d of %d tasks processed", total, n)
	check(len(problems) == 0, "%s", strings.Join(problems, "; "))
	all := append(append([]string{}, per["fast"]...), per["slow"]...)
	sort.Strings(all)
	sorted := append([]string{}, want...)
	sort.Strings(sorted)
	expectEq("processed tasks (each exactly once)", all, sorted)
	check(len(per["fast"]) > 0 && len(per["slow"]) > 0, "not both workers got work: fast=%d slow=%d", len(per["fast"]), len(per["slow"]))
	check(len(per["slow"]) <= n/4, "prefetch=1 fair dispatch not honoured: slow worker got %d of %d", len(per["slow"]), n)
	st, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
	must(err, "queue.declare passive")
	expectEq("queue depth after all acks", st.Messages, 0)
	_, err = ch.QueueDelete(q, false, false, false)
	must(err, "queue.delete")
	fmt.Printf("ok: fast=%d slow=%d\n", len(per["fast"]), len(per["slow"]))
}

// ------------------------------------------------------------------ 3
func publishSubscribe() {
	ex, n := name("logs"), 10
	pub, c1, c2 := dial(), dial(), dial()
	defer pub.Close()
	defer c1.Close()
	defer c2.Close()
	ch := channel(pub)
	must(ch.ExchangeDeclare(ex, "fanout", false, false, false, false, nil), "exchange.declare")
	a, b := newSub(c1, "", ex, ""), newSub(c2, "", ex, "")
	for _, s := range []*sub{a, b} {
		check(strings.HasPrefix(s.queue, "amq.gen-"), "server-named queue %q does not start with amq.gen-", s.queue)
	}
	check(a.queue != b.queue, "two server-named queues got the same name")
	var want []string
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("log line %d", i)
		publish(ch, ex, fmt.Sprintf("ignored.%d", i), text(body))
		want = append(want, body)
	}
	check(waitFor(func() bool { return a.size() >= n && b.size() >= n }, wait), "received %d and %d of %d", a.size(), b.size(), n)
	time.Sleep(grace)
	expectEq("subscriber 1", a.bodies(), want)
	expectEq("subscriber 2", b.bodies(), want)
	must(ch.ExchangeDelete(ex, false, false), "exchange.delete")
	fmt.Printf("ok: 2 subscribers x %d messages\n", n)
}

// ------------------------------------------------------------------ 4
func routing() {
	ex := name("direct_logs")
	pub, c1, c2 := dial(), dial(), dial()
	defer pub.Close()
	defer c1.Close()
	defer c2.Close()
	ch := channel(pub)
	must(ch.ExchangeDeclare(ex, "direct", false, false, false, false, nil), "exchange.declare")
	errOnly := newSub(c1, "", ex, "error")
	iwe := newSub(c2, "", ex, "info", "warning", "error")
	var wantErr, wantIwe []string
	for i, sev := range []string{"info", "warning", "error", "debug", "error", "info", "critical", "warning", "error", "debug"} {
		body := fmt.Sprintf("%s: message %d", sev, i)
		publish(ch, ex, sev, text(body))
		if sev == "error" {
			wantErr = append(wantErr, sev+"|"+body)
		}
		if sev == "info" || sev == "warning" || sev == "error" {
			wantIwe = append(wantIwe, sev+"|"+body)
		}
	}
	check(waitFor(func() bool { return errOnly.size() >= len(wantErr) && iwe.size() >= len(wantIwe) }, wait),
		"received %d/%d and %d/%d", errOnly.size(), len(wantErr), iwe.size(), len(wantIwe))
	time.Sleep(grace)
	expectEq("error-only consumer", errOnly.snapshot(), wantErr)
	expectEq("info+warning+error consumer", iwe.snapshot(), wantIwe)
	must(ch.ExchangeDelete(ex, false, false), "exchange.delete")
	fmt.Println("ok: exact severities per consumer")
}

// ------------------------------------------------------------------ 5
func topics() {
	ex := name("topic_logs")
	order := []string{"Q1", "Q2", "all", "kern", "critical", "mid"}
	bindings := map[string][]string{
		"Q1":       {"*.orange.*"},
		"Q2":       {"*.*.rabbit", "lazy.#"},
		"all":      {"#"},
		"kern":     {"kern.*"},
		"critical": {"*.critical"},
		"mid":      {"#.fox.#"},
	}
	table := [][2]string{
		{"quick.orange.rabbit", "Q1 Q2 all"},
		{"lazy.orange.elephant", "Q1 Q2 all"},
		{"quick.orange.fox", "Q1 all mid"},
		{"lazy.brown.fox", "Q2 all mid"},
		{"lazy.pink.rabbit", "Q2 all"},
		{"quick.brown.fox", "all mid"},
		{"orange", "all"},
		{"quick.orange.new.rabbit", "all"},
		{"lazy.orange.new.rabbit", "Q2 all"},
		{"quick.orange.male.rabbit", "all"},
		{"lazy", "Q2 all"},
		{"kern.critical", "all kern critical"},
		{"kern", "all"},
		{"kern.disk.critical", "all"},
		{"a.critical", "all critical"},
		{"fox", "all mid"},
		{"a.b.fox.c.d", "all mid"},
		{"foxes.orange.x", "Q1 all"},
	}
	pub, sc := dial(), dial()
	defer pub.Close()
	defer sc.Close()
	ch := channel(pub)
	must(ch.ExchangeDeclare(ex, "topic", false, false, false, false, nil), "exchange.declare")
	subs := map[string]*sub{}
	want := map[string][]string{}
	for _, qn := range order {
		subs[qn] = newSub(sc, "", ex, bindings[qn]...)
		want[qn] = []string{}
	}
	for i, row := range table {
		body := fmt.Sprintf("%s #%d", row[0], i)
		publish(ch, ex, row[0], text(body))
		for _, qn := range strings.Fields(row[1]) {
			want[qn] = append(want[qn], row[0]+"|"+body)
		}
	}
	waitFor(func() bool {
		for _, qn := range order {
			if subs[qn].size() < len(want[qn]) {
				return false
			}
		}
		return true
	}, wait)
	time.Sleep(grace)
	keys := func(l []string) []string {
		out := []string{}
		for _, s := range l {
			out = append(out, strings.SplitN(s, "|", 2)[0])
		}
		return out
	}
	for _, qn := range order {
		got := subs[qn].snapshot()
		if got == nil {
			got = []string{}
		}
		if !reflect.DeepEqual(got, want[qn]) {
			fail("queue %s bound %v: expected keys %v, got %v", qn, bindings[qn], keys(want[qn]), keys(got))
		}
	}
	must(ch.ExchangeDelete(ex, false, false), "exchange.delete")
	fmt.Printf("ok: %d routing keys x %d queues match the table\n", len(table), len(order))
}

// ------------------------------------------------------------------ 6
func fib(n int) int64 {
	var a, b int64 = 0, 1
	for i := 0; i < n; i++ {
		a, b = b, a+b
	}
	return a
}

func rpc(direct bool) {
	q := name("rpc_queue")
	sc, cc := dial(), dial()
	defer sc.Close()
	defer cc.Close()

	// server
	sch := channel(sc)
	_, err := sch.QueueDeclare(q, false, false, false, false, nil)
	must(err, "queue.declare")
	must(sch.Qos(1, 0, false), "basic.qos")
	reqs, err := sch.Consume(q, "", false, false, false, false, nil)
	must(err, "basic.consume")
	var mu sync.Mutex
	var seenReplyTo, problems []string
	go func() {
		for d := range reqs {
			n, _ := strconv.Atoi(string(d.Body))
			mu.Lock()
			seenReplyTo = append(seenReplyTo, d.ReplyTo)
			mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err := sch.PublishWithContext(ctx, "", d.ReplyTo, false, false, amqp.Publishing{
				CorrelationId: d.CorrelationId, Body: []byte(strconv.FormatInt(fib(n), 10))})
			cancel()
			if err == nil {
				err = d.Ack(false)
			}
			if err != nil {
				mu.Lock()
				problems = append(problems, "server: "+err.Error())
				mu.Unlock()
			}
		}
	}()

	// client
	cch := channel(cc)
	replyTo := "amq.rabbitmq.reply-to"
	if !direct {
		rq, err := cch.QueueDeclare("", false, true, true, false, nil)
		must(err, "queue.declare (callback queue)")
		replyTo = rq.Name
	}
	// for direct reply-to: consume (no-ack) from the pseudo-queue before publishing
	replies, err := cch.Consume(replyTo, "", true, false, false, false, nil)
	must(err, "basic.consume (replies)")
	got := map[string]string{}
	var stray []string
	pending := map[string]bool{}
	send := func(n int) string {
		corr := randomHex(12)
		mu.Lock()
		pending[corr] = true
		mu.Unlock()
		publish(cch, "", q, amqp.Publishing{ReplyTo: replyTo, CorrelationId: corr, Body: []byte(strconv.Itoa(n))})
		return corr
	}
	go func() {
		for d := range replies {
			mu.Lock()
			if pending[d.CorrelationId] {
				delete(pending, d.CorrelationId)
				got[d.CorrelationId] = string(d.Body)
			} else {
				stray = append(stray, d.CorrelationId+"="+string(d.Body))
			}
			mu.Unlock()
		}
	}()
	has := func(corrs ...string) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range corrs {
				if _, ok := got[c]; !ok {
					return false
				}
			}
			return true
		}
	}
	calls := 0
	for _, n := range []int{0, 1, 2, 10, 30} {
		corr := send(n)
		calls++
		check(waitFor(has(corr), wait), "no reply for fib(%d)", n)
		mu.Lock()
		r := got[corr]
		mu.Unlock()
		expectEq(fmt.Sprintf("fib(%d)", n), r, strconv.FormatInt(fib(n), 10))
	}
	inFlight := map[string]int{}
	var corrs []string
	for _, n := range []int{5, 7, 11, 13, 17, 19, 23, 29} {
		c := send(n)
		calls++
		inFlight[c] = n
		corrs = append(corrs, c)
	}
	check(waitFor(has(corrs...), wait), "pipelined replies missing")
	time.Sleep(grace)
	mu.Lock()
	defer mu.Unlock()
	for c, n := range inFlight {
		expectEq(fmt.Sprintf("pipelined fib(%d)", n), got[c], strconv.FormatInt(fib(n), 10))
	}
	check(len(stray) == 0, "unexpected replies: %v", stray)
	check(len(problems) == 0, "%s", strings.Join(problems, "; "))
	expectEq("requests seen by server", len(seenReplyTo), calls)
	for _, r := range seenReplyTo {
		if direct {
			check(strings.HasPrefix(r, "amq.rabbitmq.reply-to."), "server saw reply_to %q, expected amq.rabbitmq.reply-to.<token>", r)
		} else {
			expectEq("reply_to seen by server", r, replyTo)
		}
	}
	_, err = channel(cc).QueueDelete(q, false, false, false)
	must(err, "queue.delete")
	fmt.Printf("ok: %d calls answered with matching correlation ids\n", calls)
}

func main() {
	scenarios := map[string]func(){
		"hello_world":         helloWorld,
		"work_queues":         workQueues,
		"publish_subscribe":   publishSubscribe,
		"routing":             routing,
		"topics":              topics,
		"rpc":                 func() { rpc(false) },
		"rpc_direct_reply_to": func() { rpc(true) },
	}
	if len(os.Args) < 2 || scenarios[os.Args[1]] == nil {
		fmt.Println("usage: tutorials hello_world|work_queues|publish_subscribe|routing|topics|rpc|rpc_direct_reply_to")
		os.Exit(2)
	}
	rc := 0
	func() {
		defer func() {
			if r := recover(); r != nil {
				if f, ok := r.(failure); ok {
					fmt.Println(string(f))
				} else {
					fmt.Printf("panic: %v\n", r)
				}
				rc = 1
			}
		}()
		scenarios[os.Args[1]]()
	}()
	os.Exit(rc)
}
