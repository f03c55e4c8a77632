//! `warrenctl`: rabbitmqctl's commands over Warren's management HTTP API.
//!
//! A thin client: every command is one or a few HTTP requests to the
//! management API (never a second path into broker state). The HTTP/1.1
//! client is a few lines over `std::net::TcpStream` to keep builds small.
//!
//! Exit codes follow rabbitmqctl (sysexits): 0 ok, 64 usage, 65 not found
//! or bad input, 69 node unreachable, 70 other failures, 77 bad credentials
//! or not allowed.

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Manage a Warren node through its management API.
#[derive(Parser, Debug)]
#[command(name = "warrenctl", version, about)]
struct Cli {
    /// Node's management API as host:port (default 127.0.0.1:15672).
    #[arg(short = 'n', long, global = true)]
    node: Option<String>,
    /// Management API base URL (http://host:port), instead of --node.
    #[arg(long, global = true)]
    url: Option<String>,
    /// User (default $WARRENCTL_USER or guest).
    #[arg(short = 'u', long, global = true)]
    username: Option<String>,
    /// Password (default $WARRENCTL_PASS or guest).
    #[arg(long, global = true)]
    password: Option<String>,
    /// Virtual host for vhost-scoped commands.
    #[arg(short = 'p', long = "vhost", global = true, default_value = "/")]
    vhost: String,
    /// Output format: tsv (default), json, pretty_table.
    #[arg(short = 'f', long, global = true, default_value = "tsv")]
    formatter: String,
    /// Leave out the informational header line.
    #[arg(short = 'q', long, global = true)]
    quiet: bool,
    /// Request timeout in seconds.
    #[arg(short = 't', long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
#[allow(non_camel_case_types)]
#[command(rename_all = "snake_case")]
enum Cmd {
    /// Node status.
    status,
    /// Node environment (listeners, versions).
    environment,
    /// Cluster members (running or not) and each quorum queue's leader and
    /// replicas.
    cluster_status,
    /// Make the node (-n) join the cluster of the node at HOST:PORT (its
    /// inter-node address).
    join_cluster { seed: String },
    /// Remove a node (by name) from the cluster.
    forget_cluster_node { node: String },
    /// Add a replica of a quorum queue on NODE (rabbitmq-queues add_member).
    add_member { queue: String, node: String },
    /// Remove the replica of a quorum queue on NODE (rabbitmq-queues delete_member).
    delete_member { queue: String, node: String },
    /// Add NODE as a replica of every quorum queue (rabbitmq-queues grow).
    grow { node: String },
    /// Remove NODE from every quorum queue (rabbitmq-queues shrink).
    shrink { node: String },
    /// Wait until the node answers.
    await_startup,
    /// Queues [columns...] (default: name messages).
    list_queues { columns: Vec<String> },
    /// Exchanges [columns...] (default: name type).
    list_exchanges { columns: Vec<String> },
    /// Bindings [columns...].
    list_bindings { columns: Vec<String> },
    /// Connections [columns...] (default: user peer_host peer_port state).
    list_connections { columns: Vec<String> },
    /// Channels [columns...] (default: name user consumer_count
    /// messages_unacknowledged).
    list_channels { columns: Vec<String> },
    /// Consumers [columns...] (default: queue_name channel_pid consumer_tag
    /// ack_required prefetch_count active arguments).
    list_consumers { columns: Vec<String> },
    /// Users.
    list_users,
    /// Adds a user.
    add_user {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Deletes a user.
    delete_user { name: String },
    /// Changes a password.
    change_password {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Replaces a user's tags.
    set_user_tags { name: String, tags: Vec<String> },
    /// Vhosts.
    list_vhosts { columns: Vec<String> },
    /// Adds a vhost.
    add_vhost { name: String },
    /// Deletes a vhost and everything in it.
    delete_vhost { name: String },
    /// Sets a user's permissions in the vhost (-p).
    set_permissions {
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    /// Clears a user's permissions in the vhost (-p).
    clear_permissions { user: String },
    /// Permissions in the vhost (-p).
    list_permissions,
    /// One user's permissions in every vhost.
    list_user_permissions { user: String },
    /// Sets a user's topic permissions on a topic exchange in the vhost
    /// (-p): regular expressions over routing keys for publishing (write)
    /// and binding (read); {username} and {vhost} are expanded.
    set_topic_permissions {
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    /// Clears a user's topic permissions in the vhost (-p): on one
    /// exchange, or all of them.
    clear_topic_permissions {
        user: String,
        exchange: Option<String>,
    },
    /// Topic permissions in the vhost (-p).
    list_topic_permissions,
    /// One user's topic permissions in every vhost.
    list_user_topic_permissions { user: String },
    /// Purges a queue.
    purge_queue { queue: String },
    /// Creates a super stream: a consistent-hash exchange NAME routing each
    /// message by its routing key to one of the streams NAME-0..NAME-(N-1).
    add_super_stream {
        name: String,
        /// Number of partition streams.
        #[arg(long, default_value_t = 3)]
        partitions: u32,
    },
    /// Deletes a queue.
    delete_queue {
        queue: String,
        /// Only if it has no consumers.
        #[arg(long = "if-unused")]
        if_unused: bool,
        /// Only if it is empty.
        #[arg(long = "if-empty")]
        if_empty: bool,
    },
    /// Closes a connection (by name) with a reason.
    close_connection { name: String, reason: String },
    /// Writes the definitions to a file ("-" for stdout).
    export_definitions { path: String },
    /// Reads definitions from a file ("-" for stdin).
    import_definitions { path: String },
    /// Shows the first N messages of a queue without removing them.
    peek { queue: String, count: Option<usize> },
    /// Sets a policy.
    set_policy {
        name: String,
        pattern: String,
        definition: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
    },
    /// Clears a policy.
    clear_policy { name: String },
    /// Policies in the vhost (-p).
    list_policies,
}

/// A failed command: message and exit code.
struct Fail(String, u8);

type Res<T> = Result<T, Fail>;

struct Client {
    host: String,
    addr: String,
    auth: String,
    auth_user: String,
    timeout: Duration,
}

fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn b64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let d = s.as_bytes();
    let mut o = String::new();
    for c in d.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

impl Client {
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Res<(u16, Value)> {
        let unreachable = |e: String| {
            Fail(
                format!(
                    "Error: unable to reach the node at {} ({e}). Is Warren running with its management API on that port?",
                    self.host
                ),
                69,
            )
        };
        let sa = self
            .addr
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let mut s = TcpStream::connect_timeout(&sa, self.timeout)
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = s.set_read_timeout(Some(self.timeout));
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            self.host,
            self.auth,
            payload.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| unreachable(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| unreachable(e.to_string()))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| Fail("Error: malformed HTTP response".into(), 70))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut body = raw[split + 4..].to_vec();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()))
        };
        Ok((status, v))
    }

    /// A request that must succeed (2xx); errors become one-line messages.
    fn call(&self, method: &str, path: &str, body: Option<&Value>, what: &str) -> Res<Value> {
        let (status, v) = self.request(method, path, body)?;
        let reason = v
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match status {
            200..=299 => Ok(v),
            401 => Err(Fail(
                format!(
                    "Error: access refused for user '{}': {}",
                    self.user(),
                    if reason.is_empty() {
                        "Login failed".into()
                    } else {
                        reason
                    }
                ),
                77,
            )),
            404 => Err(Fail(format!("Error: {what} not found"), 65)),
            400 => Err(Fail(format!("Error: {reason}"), 65)),
            _ => Err(Fail(format!("Error: HTTP {status}: {reason}"), 70)),
        }
    }

    fn user(&self) -> String {
        self.auth_user.clone()
    }
}

fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = b[i..].windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[i..i + p]).trim(), 16).unwrap_or(0);
        i += p + 2;
        if size == 0 || i + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.iter().map(cell).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// Prints rows of objects with the given columns.
fn print_table(fmt: &str, quiet: bool, header: &str, cols: &[String], rows: &[Value]) {
    match fmt {
        "json" => {
            let out: Vec<Value> = rows
                .iter()
                .map(|r| {
                    Value::Object(
                        cols.iter()
                            .map(|c| (c.clone(), r.get(c).cloned().unwrap_or(Value::Null)))
                            .collect(),
                    )
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        "pretty_table" => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    cols.iter()
                        .map(|c| cell(r.get(c).unwrap_or(&Value::Null)))
                        .collect()
                })
                .collect();
            let w: Vec<usize> = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].len())
                        .max()
                        .unwrap_or(0)
                        .max(c.len())
                })
                .collect();
            let line = format!(
                "+{}+",
                w.iter()
                    .map(|n| "-".repeat(n + 2))
                    .collect::<Vec<_>>()
                    .join("+")
            );
            println!("{line}");
            println!(
                "| {} |",
                cols.iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = w[i]))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            println!("{line}");
            for r in &cells {
                println!(
                    "| {} |",
                    r.iter()
                        .enumerate()
                        .map(|(i, c)| format!("{c:<w$}", w = w[i]))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            println!("{line}");
        }
        _ => {
            if !quiet {
                println!("{header}");
                println!("{}", cols.join("\t"));
            }
            for r in rows {
                println!(
                    "{}",
                    cols.iter()
                        .map(|c| cell(r.get(c).unwrap_or(&Value::Null)))
                        .collect::<Vec<_>>()
                        .join("\t")
                );
            }
        }
    }
}

fn cols(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        given.to_vec()
    }
}

fn arr(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

fn run(cli: &Cli, c: &Client) -> Res<()> {
    let vh = enc(&cli.vhost);
    let f = cli.formatter.as_str();
    let q = cli.quiet;
    match &cli.cmd {
        Cmd::status => {
            let o = c.call("GET", "/api/overview", None, "node")?;
            let n = arr(c.call("GET", "/api/nodes", None, "node")?)
                .into_iter()
                .next()
                .unwrap_or_default();
            let v = json!({
                "node": o["node"], "product_name": o["product_name"], "product_version": o["product_version"],
                "rabbitmq_version": o["rabbitmq_version"], "uptime_ms": n["uptime"], "mem_used": n["mem_used"],
                "mem_limit": n["mem_limit"], "mem_alarm": n["mem_alarm"], "disk_free": n["disk_free"],
                "disk_free_limit": n["disk_free_limit"], "disk_free_alarm": n["disk_free_alarm"],
                "connections": o["object_totals"]["connections"], "channels": o["object_totals"]["channels"],
                "queues": o["object_totals"]["queues"], "messages": o["queue_totals"]["messages"], "listeners": o["listeners"],
            });
            if f == "json" {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                if !q {
                    println!("Status of node {}", cell(&o["node"]));
                }
                if let Value::Object(m) = &v {
                    for (k, x) in m {
                        if k == "listeners" {
                            for l in x.as_array().into_iter().flatten() {
                                println!(
                                    "listener\t{}\t{}:{}",
                                    cell(&l["protocol"]),
                                    cell(&l["ip_address"]),
                                    cell(&l["port"])
                                );
                            }
                        } else {
                            println!("{k}\t{}", cell(x));
                        }
                    }
                }
            }
        }
        Cmd::cluster_status => {
            let v = c.call("GET", "/api/cluster", None, "node")?;
            if f == "json" {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                if !q {
                    println!("Cluster status of node {}", cell(&v["this_node"]));
                }
                println!("Members");
                for n in v["nodes"].as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}{}",
                        cell(&n["name"]),
                        cell(&n["address"]),
                        if n["running"].as_bool() == Some(true) {
                            "running"
                        } else {
                            "down"
                        },
                        if n["metadata_leader"].as_bool() == Some(true) {
                            "\tmetadata leader"
                        } else {
                            ""
                        }
                    );
                }
                println!("Quorum queues");
                for qq in v["quorum_queues"].as_array().into_iter().flatten() {
                    let list = |x: &Value| {
                        x.as_array()
                            .into_iter()
                            .flatten()
                            .map(cell)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{}\t{}\tleader={}\tmembers={}\tonline={}",
                        cell(&qq["vhost"]),
                        cell(&qq["name"]),
                        cell(&qq["leader"]),
                        list(&qq["members"]),
                        list(&qq["online"])
                    );
                }
                println!("Streams");
                for st in v["streams"].as_array().into_iter().flatten() {
                    let leader = cell(&st["leader"]);
                    let names = |x: &Value, skip: &str| {
                        x.as_array()
                            .into_iter()
                            .flatten()
                            .map(cell)
                            .filter(|n| n != skip)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{}\t{}\tleader={}\tfollowers={}\tonline={}\tepoch={}",
                        cell(&st["vhost"]),
                        cell(&st["name"]),
                        leader,
                        names(&st["members"], &leader),
                        names(&st["online"], ""),
                        cell(&st["epoch"])
                    );
                }
            }
        }
        Cmd::join_cluster { seed } => {
            c.call(
                "POST",
                "/api/cluster/join",
                Some(&json!({ "seed": seed })),
                "node",
            )?;
            if !q {
                println!("Node joined the cluster through {seed}");
            }
        }
        Cmd::forget_cluster_node { node } => {
            c.call(
                "POST",
                "/api/cluster/forget",
                Some(&json!({ "node": node })),
                &format!("node '{node}'"),
            )?;
            if !q {
                println!("Removed node {node} from the cluster");
            }
        }
        Cmd::add_member { queue, node } | Cmd::delete_member { queue, node } => {
            let action = if matches!(cli.cmd, Cmd::add_member { .. }) {
                "add"
            } else {
                "delete"
            };
            c.call(
                "POST",
                "/api/cluster/members",
                Some(&json!({"vhost": cli.vhost, "queue": queue, "node": node, "action": action})),
                &format!("quorum queue '{queue}'"),
            )?;
            if !q {
                println!(
                    "{} a replica of quorum queue {queue} on {node}",
                    if action == "add" { "Added" } else { "Removed" }
                );
            }
        }
        Cmd::grow { node } | Cmd::shrink { node } => {
            let path = if matches!(cli.cmd, Cmd::grow { .. }) {
                "/api/cluster/grow"
            } else {
                "/api/cluster/shrink"
            };
            let v = c.call("POST", path, Some(&json!({ "node": node })), "node")?;
            if f == "json" {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                for r in v.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}",
                        cell(&r["vhost"]),
                        cell(&r["name"]),
                        cell(&r["result"])
                    );
                }
            }
        }
        Cmd::environment => {
            let o = c.call("GET", "/api/overview", None, "node")?;
            let v = json!({"listeners": o["listeners"], "product_version": o["product_version"], "node": o["node"]});
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Cmd::await_startup => {
            let deadline = Instant::now() + Duration::from_secs(cli.timeout);
            loop {
                match c.call("GET", "/api/overview", None, "node") {
                    Ok(_) => break,
                    Err(e) if e.1 == 69 && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Cmd::list_queues { columns } => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/queues/{vh}"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!(
                    "Timeout: {}.0 seconds ...\nListing queues for vhost {} ...",
                    cli.timeout, cli.vhost
                ),
                &cols(columns, &["name", "messages"]),
                &rows,
            );
        }
        Cmd::list_exchanges { columns } => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/exchanges/{vh}"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!("Listing exchanges for vhost {} ...", cli.vhost),
                &cols(columns, &["name", "type"]),
                &rows,
            );
        }
        Cmd::list_bindings { columns } => {
            let rows: Vec<Value> = arr(c.call(
                "GET",
                &format!("/api/bindings/{vh}"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?)
            .into_iter()
            .map(|mut b| {
                b["source_name"] = b["source"].clone();
                b["source_kind"] = json!("exchange");
                b["destination_name"] = b["destination"].clone();
                b["destination_kind"] = b["destination_type"].clone();
                b
            })
            .collect();
            let d = [
                "source_name",
                "source_kind",
                "destination_name",
                "destination_kind",
                "routing_key",
                "arguments",
            ];
            print_table(
                f,
                q,
                &format!("Listing bindings for vhost {}...", cli.vhost),
                &cols(columns, &d),
                &rows,
            );
        }
        Cmd::list_connections { columns } => {
            let rows = arr(c.call("GET", "/api/connections", None, "connections")?);
            print_table(
                f,
                q,
                "Listing connections ...",
                &cols(columns, &["user", "peer_host", "peer_port", "state"]),
                &rows,
            );
        }
        Cmd::list_channels { columns } => {
            let rows = arr(c.call("GET", "/api/channels", None, "channels")?);
            print_table(
                f,
                q,
                "Listing channels ...",
                // rabbitmqctl's defaults (pid is the channel name here).
                &cols(
                    columns,
                    &["name", "user", "consumer_count", "messages_unacknowledged"],
                ),
                &rows,
            );
        }
        Cmd::list_consumers { columns } => {
            let rows: Vec<Value> = arr(c.call(
                "GET",
                &format!("/api/consumers/{vh}"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?)
            .into_iter()
            .map(|mut x| {
                x["queue_name"] = x["queue"]["name"].clone();
                x["channel_pid"] = x["channel_details"]["name"].clone();
                x
            })
            .collect();
            print_table(
                f,
                q,
                &format!("Listing consumers in vhost {} ...", cli.vhost),
                &cols(
                    columns,
                    &[
                        "queue_name",
                        "channel_pid",
                        "consumer_tag",
                        "ack_required",
                        "prefetch_count",
                        "active",
                        "arguments",
                    ],
                ),
                &rows,
            );
        }
        Cmd::list_users => {
            let rows: Vec<Value> = arr(c.call("GET", "/api/users", None, "users")?)
                .into_iter()
                .map(|mut u| {
                    u["user"] = u["name"].clone();
                    u
                })
                .collect();
            print_table(
                f,
                q,
                "Listing users ...",
                &cols(&[], &["user", "tags"]),
                &rows,
            );
        }
        Cmd::add_user { name, new_password } => {
            if c.request("GET", &format!("/api/users/{}", enc(name)), None)?
                .0
                == 200
            {
                return Err(Fail(format!("Error: user '{name}' already exists"), 65));
            }
            c.call(
                "PUT",
                &format!("/api/users/{}", enc(name)),
                Some(&json!({"password": new_password, "tags": ""})),
                "user",
            )?;
            if !q {
                println!("Adding user \"{name}\" ...");
            }
        }
        Cmd::delete_user { name } => {
            c.call(
                "DELETE",
                &format!("/api/users/{}", enc(name)),
                None,
                &format!("user '{name}'"),
            )?;
            if !q {
                println!("Deleting user \"{name}\" ...");
            }
        }
        Cmd::change_password { name, new_password } => {
            let u = c.call(
                "GET",
                &format!("/api/users/{}", enc(name)),
                None,
                &format!("user '{name}'"),
            )?;
            c.call(
                "PUT",
                &format!("/api/users/{}", enc(name)),
                Some(&json!({"password": new_password, "tags": u["tags"]})),
                "user",
            )?;
            if !q {
                println!("Changing password for user \"{name}\" ...");
            }
        }
        Cmd::set_user_tags { name, tags } => {
            let u = c.call(
                "GET",
                &format!("/api/users/{}", enc(name)),
                None,
                &format!("user '{name}'"),
            )?;
            let body = json!({"password_hash": u["password_hash"], "hashing_algorithm": u["hashing_algorithm"], "tags": tags});
            c.call(
                "PUT",
                &format!("/api/users/{}", enc(name)),
                Some(&body),
                "user",
            )?;
            if !q {
                println!(
                    "Setting tags for user \"{name}\" to [{}] ...",
                    tags.join(", ")
                );
            }
        }
        Cmd::list_vhosts { columns } => {
            let rows = arr(c.call("GET", "/api/vhosts", None, "vhosts")?);
            print_table(f, q, "Listing vhosts ...", &cols(columns, &["name"]), &rows);
        }
        Cmd::add_vhost { name } => {
            c.call("PUT", &format!("/api/vhosts/{}", enc(name)), None, "vhost")?;
            if !q {
                println!("Adding vhost \"{name}\" ...");
            }
        }
        Cmd::delete_vhost { name } => {
            c.call(
                "DELETE",
                &format!("/api/vhosts/{}", enc(name)),
                None,
                &format!("vhost '{name}'"),
            )?;
            if !q {
                println!("Deleting vhost \"{name}\" ...");
            }
        }
        Cmd::set_permissions {
            user,
            configure,
            write,
            read,
        } => {
            let body = json!({"configure": configure, "write": write, "read": read});
            c.call(
                "PUT",
                &format!("/api/permissions/{vh}/{}", enc(user)),
                Some(&body),
                "permissions",
            )?;
            if !q {
                println!(
                    "Setting permissions for user \"{user}\" in vhost \"{}\" ...",
                    cli.vhost
                );
            }
        }
        Cmd::clear_permissions { user } => {
            c.call(
                "DELETE",
                &format!("/api/permissions/{vh}/{}", enc(user)),
                None,
                &format!("permissions of user '{user}' in vhost '{}'", cli.vhost),
            )?;
            if !q {
                println!(
                    "Clearing permissions for user \"{user}\" in vhost \"{}\" ...",
                    cli.vhost
                );
            }
        }
        Cmd::list_permissions => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/vhosts/{vh}/permissions"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!("Listing permissions for vhost \"{}\" ...", cli.vhost),
                &cols(&[], &["user", "configure", "write", "read"]),
                &rows,
            );
        }
        Cmd::list_user_permissions { user } => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/users/{}/permissions", enc(user)),
                None,
                &format!("user '{user}'"),
            )?);
            print_table(
                f,
                q,
                &format!("Listing permissions for user \"{user}\" ...",),
                &cols(&[], &["vhost", "configure", "write", "read"]),
                &rows,
            );
        }
        Cmd::set_topic_permissions {
            user,
            exchange,
            write,
            read,
        } => {
            let body = json!({"exchange": exchange, "write": write, "read": read});
            c.call(
                "PUT",
                &format!("/api/topic-permissions/{vh}/{}", enc(user)),
                Some(&body),
                "topic permissions",
            )?;
            if !q {
                println!(
                    "Setting topic permissions on \"{exchange}\" for user \"{user}\" in vhost \"{}\" ...",
                    cli.vhost
                );
            }
        }
        Cmd::clear_topic_permissions { user, exchange } => {
            let path = match exchange {
                Some(x) => format!("/api/topic-permissions/{vh}/{}/{}", enc(user), enc(x)),
                None => format!("/api/topic-permissions/{vh}/{}", enc(user)),
            };
            c.call(
                "DELETE",
                &path,
                None,
                &format!(
                    "topic permissions of user '{user}' in vhost '{}'",
                    cli.vhost
                ),
            )?;
            if !q {
                match exchange {
                    Some(x) => println!(
                        "Clearing topic permissions on \"{x}\" for user \"{user}\" in vhost \"{}\" ...",
                        cli.vhost
                    ),
                    None => println!(
                        "Clearing topic permissions for user \"{user}\" in vhost \"{}\" ...",
                        cli.vhost
                    ),
                }
            }
        }
        Cmd::list_topic_permissions => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/vhosts/{vh}/topic-permissions"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!("Listing topic permissions for vhost \"{}\" ...", cli.vhost),
                &cols(&[], &["user", "exchange", "write", "read"]),
                &rows,
            );
        }
        Cmd::list_user_topic_permissions { user } => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/users/{}/topic-permissions", enc(user)),
                None,
                &format!("user '{user}'"),
            )?);
            print_table(
                f,
                q,
                &format!("Listing topic permissions for user \"{user}\" ..."),
                &cols(&[], &["vhost", "exchange", "write", "read"]),
                &rows,
            );
        }
        Cmd::add_super_stream { name, partitions } => {
            c.call(
                "PUT",
                &format!("/api/super-streams/{vh}/{}", enc(name)),
                Some(&json!({ "partitions": partitions })),
                &format!("super stream '{name}' in vhost '{}'", cli.vhost),
            )?;
            if !q {
                println!(
                    "Adding super stream '{name}' with {partitions} partitions in vhost '{}' ...",
                    cli.vhost
                );
            }
        }
        Cmd::purge_queue { queue } => {
            c.call(
                "DELETE",
                &format!("/api/queues/{vh}/{}/contents", enc(queue)),
                None,
                &format!("queue '{queue}' in vhost '{}'", cli.vhost),
            )?;
            if !q {
                println!("Purging queue '{queue}' in vhost '{}' ...", cli.vhost);
            }
        }
        Cmd::delete_queue {
            queue,
            if_unused,
            if_empty,
        } => {
            let before = c.call(
                "GET",
                &format!("/api/queues/{vh}/{}", enc(queue)),
                None,
                &format!("queue '{queue}' in vhost '{}'", cli.vhost),
            )?;
            let mut path = format!("/api/queues/{vh}/{}?", enc(queue));
            if *if_unused {
                path.push_str("if-unused=true&");
            }
            if *if_empty {
                path.push_str("if-empty=true&");
            }
            c.call(
                "DELETE",
                path.trim_end_matches(['?', '&']),
                None,
                &format!("queue '{queue}' in vhost '{}'", cli.vhost),
            )?;
            if !q {
                println!("Deleting queue '{queue}' on vhost '{}' ...", cli.vhost);
            }
            println!(
                "Queue was successfully deleted with {} messages",
                cell(&before["messages"])
            );
        }
        Cmd::close_connection { name, reason } => {
            let (status, v) =
                c.request("DELETE", &format!("/api/connections/{}", enc(name)), None)?;
            if status == 404 {
                return Err(Fail(format!("Error: connection '{name}' not found"), 65));
            }
            if !(200..300).contains(&status) {
                return Err(Fail(
                    format!("Error: HTTP {status}: {}", cell(&v["reason"])),
                    70,
                ));
            }
            let _ = reason;
            if !q {
                println!("Closing connection {name}, reason: {reason}...");
            }
        }
        Cmd::export_definitions { path } => {
            let d = c.call("GET", "/api/definitions", None, "definitions")?;
            let text = serde_json::to_string_pretty(&d).unwrap_or_default();
            if path == "-" {
                println!("{text}");
            } else {
                std::fs::write(path, text)
                    .map_err(|e| Fail(format!("Error: cannot write {path}: {e}"), 73))?;
                if !q {
                    println!("Exported definitions for vhosts and users to \"{path}\"");
                }
            }
        }
        Cmd::import_definitions { path } => {
            let text = if path == "-" {
                let mut s = String::new();
                let _ = std::io::stdin().read_to_string(&mut s);
                s
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| Fail(format!("Error: cannot read {path}: {e}"), 66))?
            };
            let d: Value = serde_json::from_str(&text)
                .map_err(|e| Fail(format!("Error: {path} is not valid JSON: {e}"), 65))?;
            c.call("POST", "/api/definitions", Some(&d), "definitions")?;
            if !q {
                println!("Imported definitions from \"{path}\"");
            }
        }
        Cmd::peek { queue, count } => {
            let n = count.unwrap_or(1);
            let rows = arr(c.call(
                "GET",
                &format!("/api/queues/{vh}/{}/peek?count={n}", enc(queue)),
                None,
                &format!("queue '{queue}' in vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!("Peeking at {n} messages of queue '{queue}' ..."),
                &cols(
                    &[],
                    &["routing_key", "redelivered", "payload_bytes", "payload"],
                ),
                &rows,
            );
        }
        Cmd::set_policy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            let def: Value = serde_json::from_str(definition).map_err(|e| {
                Fail(
                    format!("Error: policy definition is not valid JSON: {e}"),
                    65,
                )
            })?;
            let body = json!({"pattern": pattern, "definition": def, "priority": priority, "apply-to": apply_to});
            c.call(
                "PUT",
                &format!("/api/policies/{vh}/{}", enc(name)),
                Some(&body),
                "policy",
            )?;
            if !q {
                println!(
                    "Setting policy \"{name}\" for pattern \"{pattern}\" to \"{definition}\" with priority \"{priority}\" for vhost \"{}\" ...",
                    cli.vhost
                );
            }
        }
        Cmd::clear_policy { name } => {
            c.call(
                "DELETE",
                &format!("/api/policies/{vh}/{}", enc(name)),
                None,
                &format!("policy '{name}' in vhost '{}'", cli.vhost),
            )?;
        }
        Cmd::list_policies => {
            let rows = arr(c.call(
                "GET",
                &format!("/api/policies/{vh}"),
                None,
                &format!("vhost '{}'", cli.vhost),
            )?);
            print_table(
                f,
                q,
                &format!("Listing policies for vhost \"{}\" ...", cli.vhost),
                &cols(
                    &[],
                    &[
                        "vhost",
                        "name",
                        "pattern",
                        "apply-to",
                        "definition",
                        "priority",
                    ],
                ),
                &rows,
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let base = match (&cli.url, &cli.node) {
        (Some(u), _) => u
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => "127.0.0.1:15672".into(),
    };
    let addr = if base.contains(':') {
        base.clone()
    } else {
        format!("{base}:15672")
    };
    let user = cli
        .username
        .clone()
        .or_else(|| std::env::var("WARRENCTL_USER").ok())
        .unwrap_or_else(|| "guest".into());
    let pass = cli
        .password
        .clone()
        .or_else(|| std::env::var("WARRENCTL_PASS").ok())
        .unwrap_or_else(|| "guest".into());
    let client = Client {
        host: addr.clone(),
        addr,
        auth: b64(&format!("{user}:{pass}")),
        auth_user: user,
        timeout: Duration::from_secs(cli.timeout.max(1)),
    };
    match run(&cli, &client) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg, code)) => {
            eprintln!("{msg}");
            ExitCode::from(code)
        }
    }
}
