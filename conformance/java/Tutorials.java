// The six RabbitMQ tutorials driven with the RabbitMQ Java client
// (Debian librabbitmq-client-java), as automated checks.
//
// Build: javac -cp /usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar Tutorials.java
// Run:   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//        java -cp .:/usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar \
//        Tutorials hello_world|work_queues|publish_subscribe|routing|topics|rpc|rpc_direct_reply_to
//
// Exits 0 on success; on failure the last line printed is the reason.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.ShutdownSignalException;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.BooleanSupplier;

public class Tutorials {
    static final String URL = System.getenv().getOrDefault("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    static final String RUN = UUID.randomUUID().toString().substring(0, 8);
    static final long WAIT_MS = 15000;
    static final long GRACE_MS = 400;
    static final ConnectionFactory FACTORY = new ConnectionFactory();

    static class Fail extends RuntimeException {
        Fail(String m) { super(m); }
    }

    static void check(boolean cond, String msg) { if (!cond) throw new Fail(msg); }

    static void expectEq(String what, Object got, Object want) {
        if (!got.equals(want)) throw new Fail(what + ": expected " + want + ", got " + got);
    }

    static String name(String base) { return "conf." + base + "." + RUN; }

    static Connection connect() throws Exception { return FACTORY.newConnection(); }

    static byte[] utf8(String s) { return s.getBytes(StandardCharsets.UTF_8); }

    static String str(byte[] b) { return new String(b, StandardCharsets.UTF_8); }

    static boolean waitFor(BooleanSupplier cond, long ms) throws InterruptedException {
        long deadline = System.currentTimeMillis() + ms;
        while (!cond.getAsBoolean()) {
            if (System.currentTimeMillis() > deadline) return false;
            Thread.sleep(10);
        }
        return true;
    }

    /** Reply code of the channel error hidden in an IOException from a synchronous method. */
    static int replyCode(IOException e) {
        Throwable c = e.getCause();
        if (c instanceof ShutdownSignalException) {
            Object reason = ((ShutdownSignalException) c).getReason();
            if (reason instanceof AMQP.Channel.Close) return ((AMQP.Channel.Close) reason).getReplyCode();
        }
        return -1;
    }

    /** An auto-ack consumer that records "routingKey|body" for every delivery. */
    static class Sub {
        final Channel ch;
        final String queue;
        final List<String> got = Collections.synchronizedList(new ArrayList<>());
        final List<String> bodies = Collections.synchronizedList(new ArrayList<>());

        Sub(Connection conn, String queue, String exchange, String... keys) throws Exception {
            ch = conn.createChannel();
            if (queue == null) queue = ch.queueDeclare().getQueue(); // server-named, exclusive
            this.queue = queue;
            for (String k : keys) ch.queueBind(queue, exchange, k);
            ch.basicConsume(queue, true, (tag, d) -> {
                got.add(d.getEnvelope().getRoutingKey() + "|" + str(d.getBody()));
                bodies.add(str(d.getBody()));
            }, tag -> { });
        }

        int size() { return got.size(); }

        List<String> snapshot() { synchronized (got) { return new ArrayList<>(got); } }

        List<String> bodySnapshot() { synchronized (bodies) { return new ArrayList<>(bodies); } }
    }

    // ---------------------------------------------------------------- 1
    static void helloWorld() throws Exception {
        String q = name("hello");
        int n = 10;
        try (Connection sender = connect(); Connection receiver = connect()) {
            Channel ch = sender.createChannel();
            ch.queueDeclare(q, false, false, false, null);
            List<String> want = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                String body = "Hello World! #" + i;
                ch.basicPublish("", q, null, utf8(body));
                want.add(body);
            }
            Sub rx = new Sub(receiver, q, null);
            check(waitFor(() -> rx.size() >= n, WAIT_MS), "received " + rx.size() + " of " + n);
            Thread.sleep(GRACE_MS);
            expectEq("bodies", rx.bodySnapshot(), want);
            rx.ch.close();

            for (int i = 0; i < 3; i++) ch.basicPublish("", q, null, utf8("get #" + i));
            check(waitFor(() -> {
                try { return ch.queueDeclarePassive(q).getMessageCount() >= 3; } catch (IOException e) { return false; }
            }, WAIT_MS), "message_count never reached 3");
            for (int i = 0; i < 3; i++) {
                GetResponse r = ch.basicGet(q, true);
                check(r != null, "basic.get #" + i + " returned get-empty");
                expectEq("basic.get #" + i, str(r.getBody()), "get #" + i);
                expectEq("basic.get #" + i + " message_count", r.getMessageCount(), 2 - i);
            }
            check(ch.basicGet(q, true) == null, "basic.get on drained queue did not return get-empty");
            expectEq("queue.delete-ok message_count", ch.queueDelete(q).getMessageCount(), 0);
        }
        System.out.println("ok: " + n + " consumed + 3 fetched in order");
    }

    // ---------------------------------------------------------------- 2
    static void workQueues() throws Exception {
        String q = name("task_queue");
        int n = 20;
        try (Connection conn = connect(); Connection fastConn = connect(); Connection slowConn = connect()) {
            Channel ch = conn.createChannel();
            ch.queueDeclare(q, true, false, false, null);
            Channel ch2 = conn.createChannel();
            try {
                ch2.queueDeclare(q, false, false, false, null);
                throw new Fail("redeclaring a durable queue as non-durable did not fail");
            } catch (IOException e) {
                expectEq("reply code for inequivalent redeclare", replyCode(e), 406);
            }

            List<String[]> log = Collections.synchronizedList(new ArrayList<>());
            List<String> problems = Collections.synchronizedList(new ArrayList<>());
            Object[][] workers = {{"fast", fastConn, 10L}, {"slow", slowConn, 600L}};
            for (Object[] w : workers) {
                String label = (String) w[0];
                long delay = (Long) w[2];
                Channel wch = ((Connection) w[1]).createChannel();
                wch.queueDeclare(q, true, false, false, null);
                wch.basicQos(1);
                wch.basicConsume(q, false, (tag, d) -> {
                    try { Thread.sleep(delay); } catch (InterruptedException ignored) { }
                    if (d.getEnvelope().isRedeliver()) problems.add("redelivered " + str(d.getBody()));
                    Integer mode = d.getProperties().getDeliveryMode();
                    if (mode == null || mode != 2) problems.add("delivery_mode " + mode + " for " + str(d.getBody()));
                    log.add(new String[]{label, str(d.getBody())});
                    wch.basicAck(d.getEnvelope().getDeliveryTag(), false);
                }, tag -> { });
            }
            List<String> want = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                String body = "task " + i + ".".repeat(i % 3);
                ch.basicPublish("", q, MessageProperties.PERSISTENT_TEXT_PLAIN, utf8(body));
                want.add(body);
            }
            check(waitFor(() -> log.size() >= n, WAIT_MS), "only " + log.size() + " of " + n + " tasks processed");
            Thread.sleep(GRACE_MS + 600);
            check(problems.isEmpty(), String.join("; ", problems));
            List<String> all = new ArrayList<>(), fast = new ArrayList<>(), slow = new ArrayList<>();
            synchronized (log) {
                for (String[] e : log) {
                    all.add(e[1]);
                    (e[0].equals("fast") ? fast : slow).add(e[1]);
                }
            }
            check(new HashSet<>(all).size() == all.size(), "some task was processed twice: " + all);
            List<String> sortedAll = new ArrayList<>(all), sortedWant = new ArrayList<>(want);
            Collections.sort(sortedAll);
            Collections.sort(sortedWant);
            expectEq("processed tasks", sortedAll, sortedWant);
            check(!fast.isEmpty() && !slow.isEmpty(), "not both workers got work: fast=" + fast.size() + " slow=" + slow.size());
            check(slow.size() <= n / 4, "prefetch=1 fair dispatch not honoured: slow worker got " + slow.size() + " of " + n);
            expectEq("queue depth after all acks", ch.queueDeclarePassive(q).getMessageCount(), 0);
            ch.queueDelete(q);
            System.out.println("ok: fast=" + fast.size() + " slow=" + slow.size());
        }
    }

    // ---------------------------------------------------------------- 3
    static void publishSubscribe() throws Exception {
        String ex = name("logs");
        int n = 10;
        try (Connection pub = connect(); Connection s1 = connect(); Connection s2 = connect()) {
            Channel ch = pub.createChannel();
            ch.exchangeDeclare(ex, BuiltinExchangeType.FANOUT);
            Sub a = new Sub(s1, null, ex, ""), b = new Sub(s2, null, ex, "");
            for (Sub s : new Sub[]{a, b})
                check(s.queue.startsWith("amq.gen-"), "server-named queue " + s.queue + " does not start with amq.gen-");
            check(!a.queue.equals(b.queue), "two server-named queues got the same name");
            List<String> want = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                String body = "log line " + i;
                ch.basicPublish(ex, "ignored." + i, null, utf8(body));
                want.add(body);
            }
            check(waitFor(() -> a.size() >= n && b.size() >= n, WAIT_MS), "received " + a.size() + " and " + b.size() + " of " + n);
            Thread.sleep(GRACE_MS);
            expectEq("subscriber 1", a.bodySnapshot(), want);
            expectEq("subscriber 2", b.bodySnapshot(), want);
            ch.exchangeDelete(ex);
        }
        System.out.println("ok: 2 subscribers x " + n + " messages");
    }

    // ---------------------------------------------------------------- 4
    static void routing() throws Exception {
        String ex = name("direct_logs");
        try (Connection pub = connect(); Connection s1 = connect(); Connection s2 = connect()) {
            Channel ch = pub.createChannel();
            ch.exchangeDeclare(ex, BuiltinExchangeType.DIRECT);
            Sub err = new Sub(s1, null, ex, "error");
            Sub iwe = new Sub(s2, null, ex, "info", "warning", "error");
            List<String> wantErr = new ArrayList<>(), wantIwe = new ArrayList<>();
            String[] sevs = {"info", "warning", "error", "debug", "error", "info", "critical", "warning", "error", "debug"};
            for (int i = 0; i < sevs.length; i++) {
                String body = sevs[i] + ": message " + i;
                ch.basicPublish(ex, sevs[i], null, utf8(body));
                if (sevs[i].equals("error")) wantErr.add(sevs[i] + "|" + body);
                if (Arrays.asList("info", "warning", "error").contains(sevs[i])) wantIwe.add(sevs[i] + "|" + body);
            }
            check(waitFor(() -> err.size() >= wantErr.size() && iwe.size() >= wantIwe.size(), WAIT_MS),
                    "received " + err.size() + "/" + wantErr.size() + " and " + iwe.size() + "/" + wantIwe.size());
            Thread.sleep(GRACE_MS);
            expectEq("error-only consumer", err.snapshot(), wantErr);
            expectEq("info+warning+error consumer", iwe.snapshot(), wantIwe);
            ch.exchangeDelete(ex);
        }
        System.out.println("ok: exact severities per consumer");
    }

    // ---------------------------------------------------------------- 5
    static void topics() throws Exception {
        String ex = name("topic_logs");
        Map<String, String[]> bindings = new LinkedHashMap<>();
        bindings.put("Q1", new String[]{"*.orange.*"});
        bindings.put("Q2", new String[]{"*.*.rabbit", "lazy.#"});
        bindings.put("all", new String[]{"#"});
        bindings.put("kern", new String[]{"kern.*"});
        bindings.put("critical", new String[]{"*.critical"});
        bindings.put("mid", new String[]{"#.fox.#"});
        String[][] table = {
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
        };
        try (Connection pub = connect(); Connection subConn = connect()) {
            Channel ch = pub.createChannel();
            ch.exchangeDeclare(ex, BuiltinExchangeType.TOPIC);
            Map<String, Sub> subs = new LinkedHashMap<>();
            Map<String, List<String>> want = new HashMap<>();
            for (Map.Entry<String, String[]> b : bindings.entrySet()) {
                subs.put(b.getKey(), new Sub(subConn, null, ex, b.getValue()));
                want.put(b.getKey(), new ArrayList<>());
            }
            for (int i = 0; i < table.length; i++) {
                String key = table[i][0], body = key + " #" + i;
                ch.basicPublish(ex, key, null, utf8(body));
                for (String qn : table[i][1].split(" ")) want.get(qn).add(key + "|" + body);
            }
            waitFor(() -> subs.entrySet().stream().allMatch(e -> e.getValue().size() >= want.get(e.getKey()).size()), WAIT_MS);
            Thread.sleep(GRACE_MS);
            for (String qn : subs.keySet()) {
                List<String> got = subs.get(qn).snapshot();
                if (!got.equals(want.get(qn))) {
                    List<String> gk = new ArrayList<>(), wk = new ArrayList<>();
                    for (String s : got) gk.add(s.split("\\|")[0]);
                    for (String s : want.get(qn)) wk.add(s.split("\\|")[0]);
                    throw new Fail("queue " + qn + " bound " + Arrays.toString(bindings.get(qn)) + ": expected keys " + wk + ", got " + gk);
                }
            }
            ch.exchangeDelete(ex);
        }
        System.out.println("ok: " + table.length + " routing keys x " + bindings.size() + " queues match the table");
    }

    // ---------------------------------------------------------------- 6
    static long fib(int n) {
        long a = 0, b = 1;
        for (int i = 0; i < n; i++) { long t = a + b; a = b; b = t; }
        return a;
    }

    static void rpc(boolean directReplyTo) throws Exception {
        String q = name("rpc_queue");
        try (Connection serverConn = connect(); Connection clientConn = connect()) {
            // server
            Channel sch = serverConn.createChannel();
            sch.queueDeclare(q, false, false, false, null);
            sch.basicQos(1);
            List<String> seenReplyTo = Collections.synchronizedList(new ArrayList<>());
            sch.basicConsume(q, false, (tag, d) -> {
                AMQP.BasicProperties p = d.getProperties();
                seenReplyTo.add(p.getReplyTo());
                int n = Integer.parseInt(str(d.getBody()));
                AMQP.BasicProperties reply = new AMQP.BasicProperties.Builder().correlationId(p.getCorrelationId()).build();
                sch.basicPublish("", p.getReplyTo(), reply, utf8(Long.toString(fib(n))));
                sch.basicAck(d.getEnvelope().getDeliveryTag(), false);
            }, tag -> { });

            // client
            Channel cch = clientConn.createChannel();
            String replyTo = directReplyTo ? "amq.rabbitmq.reply-to" : cch.queueDeclare().getQueue();
            Map<String, String> replies = new ConcurrentHashMap<>();
            List<String> stray = Collections.synchronizedList(new ArrayList<>());
            Set<String> pending = ConcurrentHashMap.newKeySet();
            // for direct reply-to: consume (no-ack) from the pseudo-queue before publishing
            cch.basicConsume(replyTo, true, (tag, d) -> {
                String corr = d.getProperties().getCorrelationId();
                if (corr != null && pending.remove(corr)) replies.put(corr, str(d.getBody()));
                else stray.add(corr + "=" + str(d.getBody()));
            }, tag -> { });

            int calls = 0;
            for (int n : new int[]{0, 1, 2, 10, 30}) {
                String corr = UUID.randomUUID().toString();
                pending.add(corr);
                cch.basicPublish("", q, new AMQP.BasicProperties.Builder().replyTo(replyTo).correlationId(corr).build(), utf8(Integer.toString(n)));
                calls++;
                check(waitFor(() -> replies.containsKey(corr), WAIT_MS), "no reply for fib(" + n + ")");
                expectEq("fib(" + n + ")", replies.get(corr), Long.toString(fib(n)));
            }
            Map<String, Integer> inFlight = new LinkedHashMap<>();
            for (int n : new int[]{5, 7, 11, 13, 17, 19, 23, 29}) {
                String corr = UUID.randomUUID().toString();
                pending.add(corr);
                inFlight.put(corr, n);
                cch.basicPublish("", q, new AMQP.BasicProperties.Builder().replyTo(replyTo).correlationId(corr).build(), utf8(Integer.toString(n)));
                calls++;
            }
            check(waitFor(() -> replies.keySet().containsAll(inFlight.keySet()), WAIT_MS), pending.size() + " pipelined replies missing");
            for (Map.Entry<String, Integer> e : inFlight.entrySet())
                expectEq("pipelined fib(" + e.getValue() + ")", replies.get(e.getKey()), Long.toString(fib(e.getValue())));
            Thread.sleep(GRACE_MS);
            check(stray.isEmpty(), "unexpected replies: " + stray);
            expectEq("requests seen by server", seenReplyTo.size(), calls);
            for (String r : seenReplyTo) {
                if (directReplyTo) check(r != null && r.startsWith("amq.rabbitmq.reply-to."), "server saw reply_to " + r + ", expected amq.rabbitmq.reply-to.<token>");
                else expectEq("reply_to seen by server", r, replyTo);
            }
            cch.queueDelete(q);
            System.out.println("ok: " + calls + " calls answered with matching correlation ids");
        }
    }

    public static void main(String[] args) {
        String scenario = args.length > 0 ? args[0] : "";
        int rc = 0;
        try {
            FACTORY.setUri(URL);
            FACTORY.setConnectionTimeout(10000);
            FACTORY.setAutomaticRecoveryEnabled(false);
            switch (scenario) {
                case "hello_world": helloWorld(); break;
                case "work_queues": workQueues(); break;
                case "publish_subscribe": publishSubscribe(); break;
                case "routing": routing(); break;
                case "topics": topics(); break;
                case "rpc": rpc(false); break;
                case "rpc_direct_reply_to": rpc(true); break;
                default:
                    System.out.println("unknown scenario '" + scenario + "'");
                    rc = 2;
            }
        } catch (Fail f) {
            System.out.println(f.getMessage());
            rc = 1;
        } catch (Throwable t) {
            t.printStackTrace(System.out);
            System.out.println(t.toString().replace('\n', ' '));
            rc = 1;
        }
        System.out.flush();
        System.exit(rc);
    }
}
