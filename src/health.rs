//! Health checks of a generation, shared by the `handover run` supervisor
//! and (later) the library's probation: what to probe ([`Probe`], parsed
//! from `http://HOST:PORT/PATH`, `tcp://HOST:PORT` or `exec:CMD`), how often
//! and how patiently ([`HealthCheck`]), and one run of a network probe
//! ([`Probe::run`]).
//!
//! - `http://HOST:PORT/PATH`: a `GET` over HTTP/1.1 with `Connection:
//!   close`; only the status line is read; 2xx and 3xx are healthy.
//! - `tcp://HOST:PORT`: the connection is accepted.
//! - `exec:CMD`: parsed here, run by the caller (who owns the reaping of
//!   processes: the supervisor reaps every child itself); exit status 0 is
//!   healthy.
//!
//! HOST is an IPv4 address, an IPv6 address in brackets, or a name resolved
//! at each run. Every run is bounded by [`HealthCheck::timeout`].

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default pause between two runs of a check.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default bound of one run.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default failures in a row that make a generation unhealthy.
pub(crate) const DEFAULT_THRESHOLD: u32 = 3;

/// The longest status line read from an HTTP probe.
const MAX_STATUS_LINE: usize = 1024;

/// What one run of a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// `GET path` on `host:port`; 2xx or 3xx is healthy.
    Http {
        /// A name or an IP address (IPv6 without the brackets).
        host: String,
        /// The port.
        port: u16,
        /// The request target, starting with `/`.
        path: String,
    },
    /// A TCP connection to `host:port` is accepted.
    Tcp {
        /// A name or an IP address (IPv6 without the brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// `sh -c command` exits 0 (run by the caller).
    Exec {
        /// The shell command.
        command: String,
    },
}

/// A probe with its schedule: run every `interval`, each run bounded by
/// `timeout`; `threshold` failures in a row make the generation unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    /// What to probe.
    pub(crate) probe: Probe,
    /// From the start of one run to the start of the next.
    pub(crate) interval: Duration,
    /// Bound of one run; a run that takes longer failed.
    pub(crate) timeout: Duration,
    /// Failures in a row that make the generation unhealthy (at least 1).
    pub(crate) threshold: u32,
}

impl HealthCheck {
    /// `probe` with the default interval, timeout and threshold.
    pub(crate) fn new(probe: Probe) -> Self {
        HealthCheck {
            probe,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_owned()
            }
        };
        match self {
            Probe::Http {
                host: h,
                port,
                path,
            } => write!(f, "http://{}:{port}{path}", host(h)),
            Probe::Tcp { host: h, port } => write!(f, "tcp://{}:{port}", host(h)),
            Probe::Exec { command } => write!(f, "exec:{command}"),
        }
    }
}

/// Splits `HOST:PORT` (HOST possibly `[IPv6]`).
fn host_port(text: &str, scheme: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("expected {scheme}://[IPv6]:PORT, got {text:?}"))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
        (host, port)
    } else {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("the port is missing (expected {scheme}://HOST:PORT)"))?;
        if host.contains(':') {
            return Err(format!(
                "put an IPv6 address in brackets: {scheme}://[{host}]:{port}"
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(format!(
            "the host is missing (expected {scheme}://HOST:PORT)"
        ));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("{host:?} is not a host name or an IP address"));
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the port {port:?} is not a number"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("the port {port} is not in 1-65535")),
        Ok(port) => Ok((host.to_owned(), port)),
    }
}

impl Probe {
    /// Parses `http://HOST:PORT/PATH`, `tcp://HOST:PORT` or `exec:CMD`. The
    /// error says what is wrong, without repeating `text`.
    pub(crate) fn parse(text: &str) -> Result<Probe, String> {
        if let Some(command) = text.strip_prefix("exec:") {
            if command.trim().is_empty() {
                return Err("exec: needs a command (exec:CMD)".to_owned());
            }
            return Ok(Probe::Exec {
                command: command.to_owned(),
            });
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, "/"),
            };
            if path.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "the path {path:?} contains spaces or control characters"
                ));
            }
            let (host, port) = host_port(authority, "http")?;
            return Ok(Probe::Http {
                host,
                port,
                path: path.to_owned(),
            });
        }
        if let Some(rest) = text.strip_prefix("tcp://") {
            if rest.contains('/') {
                return Err("a tcp:// check takes no path (tcp://HOST:PORT)".to_owned());
            }
            let (host, port) = host_port(rest, "tcp")?;
            return Ok(Probe::Tcp { host, port });
        }
        if text.starts_with("https://") {
            return Err(
                "https is not supported (probe the plain HTTP port, or use exec:curl ...)"
                    .to_owned(),
            );
        }
        Err(
            "not a health check (use http://HOST:PORT/PATH, tcp://HOST:PORT or exec:CMD)"
                .to_owned(),
        )
    }

    /// Runs a network probe once, within `timeout`: `Ok` when healthy,
    /// otherwise what was wrong. An [`Probe::Exec`] is not run here (the
    /// caller runs and reaps it): it is an error.
    pub(crate) async fn run(&self, timeout: Duration) -> Result<(), String> {
        let work = async {
            match self {
                Probe::Http { host, port, path } => http_get(host, *port, path).await,
                Probe::Tcp { host, port } => connect(host, *port).await.map(drop),
                Probe::Exec { .. } => Err("an exec: check is run by the caller".to_owned()),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
        }
    }
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))
}

/// `GET path` with `Connection: close`; reads the status line only.
async fn http_get(host: &str, port: u16, path: &str) -> Result<(), String> {
    let mut stream = connect(host, port).await?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: handover-health\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !line.contains(&b'\n') {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read the response: {e}"))?;
        if n == 0 {
            return Err(if line.is_empty() {
                "the connection closed without a response".to_owned()
            } else {
                "the connection closed inside the status line".to_owned()
            });
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_STATUS_LINE && !line[..MAX_STATUS_LINE].contains(&b'\n') {
            return Err("the status line is too long".to_owned());
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let status_line = String::from_utf8_lossy(&line[..end]);
    let code = status_code(status_line.trim_end())?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

/// The code of an `HTTP/1.x NNN reason` status line.
fn status_code(line: &str) -> Result<u16, String> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") || code.len() != 3 {
        return Err(format!("not an HTTP status line: {line:?}"));
    }
    code.parse()
        .map_err(|_| format!("not an HTTP status line: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            Probe::parse("http://127.0.0.1:8080/healthz"),
            Ok(Probe::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into()
            })
        );
        assert_eq!(
            Probe::parse("http://localhost:80"),
            Ok(Probe::Http {
                host: "localhost".into(),
                port: 80,
                path: "/".into()
            })
        );
        assert_eq!(
            Probe::parse("http://[::1]:9/a?b=c"),
            Ok(Probe::Http {
                host: "::1".into(),
                port: 9,
                path: "/a?b=c".into()
            })
        );
        assert_eq!(
            Probe::parse("tcp://10.0.0.1:5432"),
            Ok(Probe::Tcp {
                host: "10.0.0.1".into(),
                port: 5432
            })
        );
        assert_eq!(
            Probe::parse("exec:test -e /tmp/ok"),
            Ok(Probe::Exec {
                command: "test -e /tmp/ok".into()
            })
        );
        for text in [
            "http://127.0.0.1:8080/healthz",
            "http://[::1]:9/a",
            "tcp://h:1",
            "exec:true",
        ] {
            assert_eq!(Probe::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (text, says) in [
            ("", "not a health check"),
            ("ftp://h:1", "not a health check"),
            ("https://h:443/", "https is not supported"),
            ("exec:", "needs a command"),
            ("exec:   ", "needs a command"),
            ("http://127.0.0.1/healthz", "the port is missing"),
            ("http://:80/", "the host is missing"),
            ("http://h:0/", "not in 1-65535"),
            ("http://h:70000/", "not in 1-65535"),
            ("http://h:8x/", "is not a number"),
            ("http://::1:80/", "brackets"),
            ("http://[zz]:80/", "not an IPv6 address"),
            ("http://h:80/a b", "spaces"),
            ("http://a@b:80/", "not a host name"),
            ("tcp://h:80/x", "takes no path"),
            ("tcp://h", "the port is missing"),
        ] {
            let e = Probe::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(status_code("HTTP/1.0 503"), Ok(503));
        assert!(status_code("SSH-2.0-OpenSSH").is_err());
        assert!(status_code("HTTP/1.1 20 OK").is_err());
    }

    /// A server that answers each connection with `response`, once.
    async fn answering(response: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let (port, server) = answering("HTTP/1.1 204 No Content\r\n\r\n").await;
        let probe = Probe::parse(&format!("http://127.0.0.1:{port}/healthz")).unwrap();
        assert_eq!(probe.run(Duration::from_secs(5)).await, Ok(()));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");

        let (port, _server) = answering("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let probe = Probe::parse(&format!("http://127.0.0.1:{port}/healthz")).unwrap();
        let e = probe.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("answered 503"), "{e}");

        let (port, _server) = answering("garbage\r\n").await;
        let probe = Probe::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let e = probe.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("not an HTTP status line"), "{e}");
    }

    #[tokio::test]
    async fn tcp_probe_and_timeouts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = Probe::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
        assert_eq!(tcp.run(Duration::from_secs(5)).await, Ok(()));
        // Accepted by the kernel but never answered: the HTTP probe times out.
        let http = Probe::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let e = http.run(Duration::from_millis(100)).await.unwrap_err();
        assert!(e.contains("no answer within 100ms"), "{e}");
        drop(listener);
        let e = tcp.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
        let exec = Probe::parse("exec:true").unwrap();
        assert!(exec.run(Duration::from_secs(1)).await.is_err());
    }
}
