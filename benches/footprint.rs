//! The supervisor's resident memory and the binaries' stripped sizes.
//!
//! `cargo bench --bench footprint`.
//!
//! - Size of the release `handover` binary after `strip` (of a copy), and, for reference, of
//!   `examples/http_server` (an app using the library) and `examples/plain_server` (the same
//!   app without it): their difference is what the library adds to an app.
//! - VmRSS and VmHWM of `handover run` supervising `plain_server`, after the first ready and
//!   after 20 upgrades (median of 3 starts); VmRSS of the apps, idle after start, for
//!   reference.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use handover::testkit::{status_kb, Server};

const STARTS: usize = 3;
const UPGRADES: u64 = 20;
const WAIT: Duration = Duration::from_secs(20);

fn main() {
    common::main("footprint", run);
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let built = common::build_examples(&["http_server", "plain_server"])?;
    let handover = common::build_handover_bin()?;
    println!("\nfootprint (release builds)");
    println!("machine: {}", common::machine());
    let dir = common::TempDir::new("bench-footprint")?;

    println!(
        "\n| {:<44} | {:>14} | {:>14} |",
        "binary", "size", "stripped"
    );
    println!("|{:-<46}|{:->16}|{:->16}|", "", "", "");
    let mut binaries: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(bin) = &handover {
        binaries.push(("handover (the entrypoint)", bin.clone()));
    }
    binaries.push((
        "examples/http_server (app with the library)",
        built[0].clone(),
    ));
    binaries.push(("examples/plain_server (same app without)", built[1].clone()));
    let mut stripped_sizes = Vec::new();
    for (name, path) in &binaries {
        let size = file_size(path)?;
        let stripped = stripped_size(path, dir.path())?;
        stripped_sizes.push(stripped);
        println!(
            "| {:<44} | {:>14} | {:>14} |",
            name,
            kib(size),
            stripped.map_or_else(|| "no `strip`".to_string(), kib)
        );
    }
    if handover.is_none() {
        println!("| handover: n/a, `handover run` is not in this tree yet (src/bin/handover.rs) |");
    }

    println!(
        "\n| {:<44} | {:>17} | {:>17} | {:>17} |",
        "process", "VmRSS at ready", "VmRSS after 20 up", "VmHWM after 20 up"
    );
    println!("|{:-<46}|{:->19}|{:->19}|{:->19}|", "", "", "", "");
    if let Some(bin) = &handover {
        let mut at_ready = Vec::new();
        let mut after = Vec::new();
        let mut hwm = Vec::new();
        let mut app = Vec::new();
        for _ in 0..STARTS {
            let (r, a, h, p) = supervisor_rss(bin, &built[1], dir.path())?;
            at_ready.push(r);
            after.push(a);
            hwm.push(h);
            app.push(p);
        }
        let med = |v: &[u64]| common::median(v).map_or_else(|| "-".into(), kib_from_kb);
        println!(
            "| {:<44} | {:>17} | {:>17} | {:>17} |",
            "handover run (supervisor)",
            med(&at_ready),
            med(&after),
            med(&hwm)
        );
        println!(
            "| {:<44} | {:>17} | {:>17} | {:>17} |",
            "plain_server under it (app)",
            med(&app),
            "",
            ""
        );
    } else {
        println!("| handover run: n/a, not in this tree yet |");
    }
    for (name, exe) in [
        ("http_server alone", &built[0]),
        ("plain_server alone", &built[1]),
    ] {
        let mut rss = Vec::new();
        for _ in 0..STARTS {
            let mut cmd = Command::new(exe);
            cmd.args(["--listen", "127.0.0.1:0"]);
            let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
            common::register_group(server.pid());
            let ready = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
            rss.push(status_kb(ready.pid, "VmRSS").unwrap_or(0));
            let _ = server.stop(handover::Signal::SIGTERM, WAIT);
        }
        println!(
            "| {:<44} | {:>17} | {:>17} | {:>17} |",
            name,
            common::median(&rss).map_or_else(|| "-".into(), kib_from_kb),
            "",
            ""
        );
    }
    println!("footprint took {:.0?}", started.elapsed());
    Ok(())
}

/// Starts `handover run -- plain_server`, reads the supervisor's VmRSS at the first ready,
/// upgrades it UPGRADES times, reads VmRSS and VmHWM again; also the app's VmRSS (kB).
fn supervisor_rss(
    handover: &Path,
    plain_server: &Path,
    dir: &Path,
) -> Result<(u64, u64, u64, u64), String> {
    let mut cmd = Command::new(handover);
    cmd.args(["run", "--listen", "http=tcp://127.0.0.1:0", "--control"])
        .arg(dir.join("control.sock"))
        .arg("--")
        .arg(plain_server);
    let server = Server::spawn(cmd).map_err(|e| e.to_string())?;
    common::register_group(server.pid());
    let first = server.wait_ready(1, WAIT).map_err(|e| e.to_string())?;
    let supervisor = server.pid();
    let at_ready = status_kb(supervisor, "VmRSS").unwrap_or(0);
    let app = status_kb(first.pid, "VmRSS").unwrap_or(0);
    let mut current = first;
    for _ in 0..UPGRADES {
        server
            .signal(supervisor, handover::Signal::SIGHUP)
            .map_err(|e| e.to_string())?;
        let next = server
            .wait_ready(current.generation + 1, WAIT)
            .map_err(|e| e.to_string())?;
        server
            .wait_exit(current.pid, WAIT)
            .map_err(|e| e.to_string())?;
        current = next;
    }
    let after = status_kb(supervisor, "VmRSS").unwrap_or(0);
    let hwm = status_kb(supervisor, "VmHWM").unwrap_or(0);
    let _ = server.stop(handover::Signal::SIGTERM, WAIT);
    Ok((at_ready, after, hwm, app))
}

fn file_size(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Size of a stripped copy of `path`; `None` if there is no `strip` program.
fn stripped_size(path: &Path, dir: &Path) -> Result<Option<u64>, String> {
    let name = path.file_name().ok_or("no file name")?;
    let copy = dir.join(name);
    std::fs::copy(path, &copy).map_err(|e| format!("copying {}: {e}", path.display()))?;
    match Command::new("strip").arg(&copy).status() {
        Ok(status) if status.success() => Ok(Some(file_size(&copy)?)),
        Ok(status) => Err(format!("strip {}: {status}", copy.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("strip: {e}")),
    }
}

fn kib(bytes: u64) -> String {
    format!("{} KiB", common::thousands(bytes / 1024))
}

fn kib_from_kb(kb: u64) -> String {
    format!("{} KiB", common::thousands(kb))
}
