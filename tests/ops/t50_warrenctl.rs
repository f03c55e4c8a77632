//! warrenctl end to end against a running broker.

use crate::common::*;
use std::process::Command;

fn ctl(b: &TestBroker, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .arg("-n")
        .arg(b.mgmt_addr.unwrap().to_string())
        .args(args)
        .env_remove("WARRENCTL_USER")
        .env_remove("WARRENCTL_PASS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

async fn run(b: &TestBroker, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let addr = b.mgmt_addr;
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_warrenctl"))
            .arg("-n")
            .arg(addr.unwrap().to_string())
            .args(&args)
            .env_remove("WARRENCTL_USER")
            .env_remove("WARRENCTL_PASS")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn commands_columns_exit_codes() {
    let b = TestBroker::start().await;
    let _ = ctl;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "work").await;
    for i in 0..3 {
        publish(&ch, "", "work", format!("job-{i}").as_bytes()).await;
    }
    settle().await;

    let (c, out, _) = run(&b, &["-q", "list_queues"]).await;
    assert_eq!((c, out.as_str()), (0, "work\t3\n"));
    let (c, out, _) = run(
        &b,
        &[
            "list_queues",
            "name",
            "messages_ready",
            "consumers",
            "durable",
        ],
    )
    .await;
    assert_eq!(c, 0);
    assert!(
        out.contains("name\tmessages_ready\tconsumers\tdurable\n"),
        "{out}"
    );
    assert!(out.ends_with("work\t3\t0\tfalse\n"), "{out}");
    let (_, out, _) = run(
        &b,
        &["--formatter", "json", "list_queues", "name", "messages"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, serde_json::json!([{"name": "work", "messages": 3}]));
    let (_, out, _) = run(&b, &["--formatter", "pretty_table", "list_queues"]).await;
    assert!(out.contains("| work | 3        |"), "{out}");
    let (c, out, _) = run(&b, &["-q", "peek", "work", "2"]).await;
    assert_eq!(c, 0);
    assert_eq!(out, "work\tfalse\t5\tjob-0\nwork\tfalse\t5\tjob-1\n");
    let (_, out, _) = run(&b, &["-q", "list_exchanges"]).await;
    assert!(out.contains("amq.topic\ttopic\n"), "{out}");
    let (_, out, _) = run(&b, &["-q", "list_connections"]).await;
    assert!(out.starts_with("guest\t127.0.0.1\t"), "{out}");
    let (_, out, _) = run(&b, &["-q", "list_channels"]).await;
    assert_eq!(out.lines().count(), 1);

    assert_eq!(run(&b, &["add_user", "carol", "pw"]).await.0, 0);
    assert_eq!(run(&b, &["add_user", "carol", "pw"]).await.0, 65);
    assert_eq!(
        run(&b, &["set_user_tags", "carol", "management"]).await.0,
        0
    );
    assert_eq!(run(&b, &["add_vhost", "v9"]).await.0, 0);
    assert_eq!(
        run(
            &b,
            &["-p", "v9", "set_permissions", "carol", ".*", ".*", ".*"]
        )
        .await
        .0,
        0
    );
    let (_, out, _) = run(&b, &["-q", "-p", "v9", "list_permissions"]).await;
    assert_eq!(out, "carol\t.*\t.*\t.*\n");
    let (_, out, _) = run(&b, &["-q", "list_user_permissions", "carol"]).await;
    assert_eq!(out, "v9\t.*\t.*\t.*\n");
    let (_, out, _) = run(&b, &["-q", "list_users"]).await;
    assert!(out.contains("carol\t[management]\n"), "{out}");
    let (_, out, _) = run(&b, &["-q", "list_vhosts"]).await;
    assert_eq!(out, "/\nv9\n");
    assert_eq!(run(&b, &["change_password", "carol", "pw2"]).await.0, 0);
    let (c, _, _) = run(&b, &["-u", "carol", "--password", "pw2", "list_vhosts"]).await;
    assert_eq!(c, 0);
    let (c, _, err) = run(&b, &["-u", "carol", "--password", "pw", "list_vhosts"]).await;
    assert_eq!(c, 77, "{err}");
    assert!(err.starts_with("Error: access refused"), "{err}");
    assert_eq!(
        run(&b, &["-p", "v9", "clear_permissions", "carol"]).await.0,
        0
    );
    assert_eq!(run(&b, &["delete_user", "carol"]).await.0, 0);
    assert_eq!(run(&b, &["delete_vhost", "v9"]).await.0, 0);

    assert_eq!(
        run(
            &b,
            &[
                "set_policy",
                "lim",
                "^work$",
                "{\"max-length\": 10}",
                "--apply-to",
                "queues"
            ]
        )
        .await
        .0,
        0
    );
    let (_, out, _) = run(&b, &["-q", "list_policies"]).await;
    assert!(out.starts_with("/\tlim\t^work$\tqueues\t"), "{out}");
    assert_eq!(run(&b, &["clear_policy", "lim"]).await.0, 0);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defs.json");
    assert_eq!(
        run(&b, &["export_definitions", path.to_str().unwrap()])
            .await
            .0,
        0
    );
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"users\"")
    );
    assert_eq!(
        run(&b, &["import_definitions", path.to_str().unwrap()])
            .await
            .0,
        0
    );

    let (c, _, err) = run(&b, &["purge_queue", "missing"]).await;
    assert_eq!(c, 65);
    assert_eq!(err.trim(), "Error: queue 'missing' in vhost '/' not found");
    assert_eq!(run(&b, &["purge_queue", "work"]).await.0, 0);
    let (c, out, _) = run(&b, &["delete_queue", "work"]).await;
    assert_eq!(c, 0);
    assert!(
        out.contains("Queue was successfully deleted with 0 messages"),
        "{out}"
    );

    let (_, out, _) = run(
        &b,
        &["-q", "--formatter", "json", "list_connections", "name"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let name = v[0]["name"].as_str().unwrap().to_string();
    assert_eq!(run(&b, &["close_connection", &name, "bye"]).await.0, 0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!conn.status().connected());
    assert_eq!(run(&b, &["close_connection", "nope", "x"]).await.0, 65);

    assert_eq!(run(&b, &["status"]).await.0, 0);
    assert_eq!(run(&b, &["await_startup"]).await.0, 0);
    // Unreachable node.
    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_warrenctl"))
            .args(["-n", "127.0.0.1:1", "-t", "2", "status"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unable to reach the node"));
}
