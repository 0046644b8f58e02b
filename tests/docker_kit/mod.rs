//! Helpers of the Docker tests (`tests/docker.rs`): the test image, built once per run from
//! `docker/Dockerfile` with static binaries (no registry: `FROM scratch`), and guards that
//! remove every container, service and derived image a test made.
//!
//! The image's tag is a hash of what went into it, so the test processes of one run (nextest
//! runs each test in a process of its own) build it once and share it; a file lock keeps two
//! of them from building at the same time. Older `handover-test` tags are removed when a new
//! one is built.
#![allow(dead_code)]

use std::fs::File;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::{run_with_deadline, Output, TempDir};

/// The repository of the test images.
pub const REPO: &str = "handover-test";
/// Deadline of one `docker` command.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of the static build and the image build.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// The target of the static binaries.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Runs `docker ARGS` to its end (killed after two minutes).
pub fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_with_deadline(cmd, DOCKER_TIMEOUT)
}

/// `docker ARGS`, which must exit 0; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert_eq!(out.code, Some(0), "docker {args:?} failed: {out:?}");
    out.stdout.trim().to_owned()
}

/// Whether the Docker daemon answers. Without one the Docker tests are skipped, except under
/// CI (`CI` set), where that is a failure: .ci/run promises that they run.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<Result<String, String>> = OnceLock::new();
    let result = AVAILABLE.get_or_init(|| {
        let mut cmd = Command::new("docker");
        cmd.args(["version", "--format", "{{.Server.Version}}"]);
        match cmd.output() {
            Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
            Ok(out) => Err(format!(
                "`docker version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run docker: {e}")),
        }
    });
    match result {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the Docker daemon is needed in CI: {e}"
            );
            eprintln!("skipping: no Docker daemon ({e})");
            false
        }
    }
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds `handover`, `http_server` and `plain_server` statically (dev profile without debug
/// info: quick to build, small enough) in `target/static`; returns their paths.
fn build_static() -> Vec<PathBuf> {
    let target_dir = manifest_dir().join("target").join("static");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(manifest_dir())
        .args(["build", "--target", TRIPLE, "--target-dir"])
        .arg(&target_dir)
        .args([
            "--bin",
            "handover",
            "--example",
            "http_server",
            "--example",
            "plain_server",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let out = run_with_deadline(cmd, BUILD_TIMEOUT);
    assert_eq!(out.code, Some(0), "static build failed: {}", out.stderr);
    let dir = target_dir.join(TRIPLE).join("debug");
    vec![
        dir.join("handover"),
        dir.join("examples").join("http_server"),
        dir.join("examples").join("plain_server"),
    ]
}

/// Debian's busybox-static (the image's /bin/sh).
fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox is needed for the test image (apt-get install busybox-static)")
}

fn hash_files(files: &[PathBuf]) -> u64 {
    // FNV-1a: stable across runs and Rust versions (DefaultHasher is not promised to be).
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        h.write(&bytes);
        h.write(&[0xff]);
    }
    h.finish()
}

/// An exclusive lock on a file, released on drop.
struct Lock(nix::fcntl::Flock<File>);

fn lock(path: &Path) -> Lock {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) {
        Ok(l) => Lock(l),
        Err((_, e)) => panic!("lock {}: {e}", path.display()),
    }
}

/// The test image (`handover-test:<hash>`), built on first use in this run.
pub fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let static_dir = manifest_dir().join("target").join("static");
        std::fs::create_dir_all(&static_dir).expect("create target/static");
        let _lock = lock(&static_dir.join("docker-image.lock"));
        let binaries = build_static();
        let dockerfile = manifest_dir().join("docker").join("Dockerfile");
        let mut inputs = vec![dockerfile.clone(), busybox()];
        inputs.extend(binaries.iter().cloned());
        let tag = format!("{REPO}:{:016x}", hash_files(&inputs));
        if docker(&["image", "inspect", &tag]).code == Some(0) {
            return tag;
        }
        let ctx = TempDir::new("docker-context");
        for file in binaries.iter().chain([&busybox()]) {
            let name = file.file_name().expect("a file name");
            std::fs::copy(file, ctx.join(&name.to_string_lossy()))
                .unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
        }
        let mut cmd = Command::new("docker");
        cmd.args(["build", "-q", "-f"])
            .arg(&dockerfile)
            .args(["-t", &tag])
            .arg(ctx.path());
        let out = run_with_deadline(cmd, BUILD_TIMEOUT);
        assert_eq!(out.code, Some(0), "docker build failed: {out:?}");
        // Older test images go: only this run's tag (and what derives from it) stays.
        let tags = docker_ok(&["images", REPO, "--format", "{{.Repository}}:{{.Tag}}"]);
        for old in tags.lines().filter(|t| !t.starts_with(tag.as_str())) {
            let _ = docker(&["rmi", old]);
        }
        tag
    })
}

/// An image `FROM` the test image with `lines` added (a derived release), tagged
/// `<image>-<suffix>`, built from an empty context or from `context`.
pub fn derived_image(suffix: &str, lines: &str, context: &[(&str, &str)]) -> String {
    let tag = format!("{}-{suffix}", image());
    let ctx = TempDir::new("docker-derived");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\n{lines}\n", image()),
    )
    .unwrap();
    for (name, body) in context {
        use std::os::unix::fs::PermissionsExt;
        let path = ctx.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = ctx.path().to_string_lossy().into_owned();
    docker_ok(&["build", "-q", "-t", &tag, &path]);
    tag
}

/// A container, removed (with its anonymous volumes) on drop.
pub struct Container {
    pub name: String,
}

/// A name unique to this test process.
pub fn unique_name(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{REPO}-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl Container {
    /// `docker run -d --name <unique> DOCKER_ARGS <image> ARGS`, with the app port (8080)
    /// and the admin port (9090) published on free ports of 127.0.0.1.
    pub fn run(docker_args: &[&str], args: &[&str]) -> Container {
        let name = unique_name("c");
        let mut all = vec![
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            "127.0.0.1::8080",
            "-p",
            "127.0.0.1::9090",
        ];
        all.extend_from_slice(docker_args);
        all.push(image());
        all.extend_from_slice(args);
        let container = Container { name: name.clone() };
        docker_ok(&all);
        container
    }

    /// The host address of container port `port` (published on 127.0.0.1).
    pub fn addr(&self, port: u16) -> SocketAddr {
        let text = docker_ok(&["port", &self.name, &format!("{port}/tcp")]);
        text.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no published address for {port} in {text:?}"))
    }

    /// Its address on Docker's default bridge, reachable from the host without the
    /// userland proxy of published ports.
    pub fn bridge_addr(&self, port: u16) -> SocketAddr {
        let ip = self.inspect("{{.NetworkSettings.IPAddress}}");
        format!("{ip}:{port}")
            .parse()
            .unwrap_or_else(|_| panic!("no bridge address: {ip:?}"))
    }

    /// `docker exec <c> ARGS`.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// `docker kill --signal SIG <c>`.
    pub fn kill(&self, signal: &str) {
        docker_ok(&["kill", "--signal", signal, &self.name]);
    }

    /// `docker logs` (stdout and stderr of the supervisor and the app).
    pub fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", out.stdout, out.stderr)
    }

    /// `docker inspect -f FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    /// Its health status (`starting`, `healthy`, `unhealthy`).
    pub fn health(&self) -> String {
        self.inspect("{{.State.Health.Status}}")
    }

    /// `docker wait`: its exit code.
    pub fn wait(&self) -> i32 {
        docker_ok(&["wait", &self.name])
            .parse()
            .expect("docker wait prints a number")
    }

    /// Rows of `docker top <c> -o pid,stat,comm`: `(pid, stat, comm)`.
    pub fn top(&self) -> Vec<(String, String, String)> {
        docker_ok(&["top", &self.name, "-o", "pid,stat,comm"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.into(), w.next()?.into(), w.next()?.into()))
            })
            .collect()
    }

    /// Everything a failing test wants to see.
    pub fn dump(&self) -> String {
        format!("---- docker logs {} ----\n{}", self.name, self.logs())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// An image tag removed on drop.
pub struct ImageGuard(pub String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}
