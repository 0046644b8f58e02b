//! Raw HTTP/1.1 on a `TcpStream`: what the wire carries, for tests that watch one connection
//! (its headers, when it closes, which generation answers on it).

use std::io::{Read, Write};
use std::net::TcpStream;

/// Sends `GET path` on `stream` (one write) and reads one response: (head, lowercase; body).
pub fn get(stream: &mut TcpStream, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    read_response(stream)
}

/// Reads one response with a `content-length`: (head, lowercase; body).
pub fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the response head");
        assert_eq!(
            n,
            1,
            "EOF inside the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("read the body");
    (head, String::from_utf8_lossy(&body).into_owned())
}
