//! Users, vhosts, permissions and policies survive a restart (the real
//! binary, same data directory).

use crate::process::WarrenProcess;
use std::process::Command;

fn mgmt_addr(p: &WarrenProcess, nth: usize) -> String {
    // The log line "management API listening on http://ADDR".
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = p.log_text();
        let key = "management API listening on http://";
        if let Some((i, _)) = log.match_indices(key).nth(nth - 1) {
            let rest = &log[i + key.len()..];
            return rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no mgmt line in log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn ctl(addr: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args(["-n", addr, "-q"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn users_and_permissions_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = WarrenProcess::start(&data);
    let a = mgmt_addr(&p, 1);
    assert_eq!(ctl(&a, &["add_vhost", "keep"]).0, 0);
    assert_eq!(ctl(&a, &["add_user", "dave", "pw"]).0, 0);
    assert_eq!(ctl(&a, &["set_user_tags", "dave", "monitoring"]).0, 0);
    assert_eq!(
        ctl(
            &a,
            &["-p", "keep", "set_permissions", "dave", "^d", "^d", ".*"]
        )
        .0,
        0
    );
    // guest deleted (as dave cannot administer, do it last as guest):
    // the default user must not come back on restart.
    assert_eq!(ctl(&a, &["delete_user", "guest"]).0, 0);
    p.stop();
    let p = WarrenProcess::start(&data);
    let a = mgmt_addr(&p, 2);
    let (c, out) = ctl(&a, &["list_vhosts"]);
    assert_eq!(c, 77, "guest is gone after restart: {out}");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_warrenctl"))
            .args(["-n", &a, "-q", "-u", "dave", "--password", "pw"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (c, out) = run(&["list_vhosts"]);
    assert_eq!((c, out.as_str()), (0, "/\nkeep\n"));
    p.stop();
}
