//! A minimal in-memory S3 responder for the benchmark only: GET, HEAD, PUT (with
//! If-None-Match / If-Match) and DELETE of objects, path-style. It answers every request at
//! once and in parallel, as S3 does, so that the hidden-latency figures measure s3cached's
//! fan-out rather than a slow emulator's throughput. The tests use a real S3-compatible
//! server (moto); this is never a stand-in there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::s3::{head_end, read_message};

type Objects = Arc<Mutex<HashMap<String, (Vec<u8>, String)>>>;

pub async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let objects: Objects = Arc::default();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let objects = objects.clone();
            tokio::spawn(async move {
                let _ = serve(socket, objects).await;
            });
        }
    });
    addr
}

async fn serve(mut socket: TcpStream, objects: Objects) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(mut message) = read_message(&mut socket, &mut buf).await? {
        let end = head_end(&message).expect("a whole message");
        let body = message.split_off(end + 4);
        let head = String::from_utf8_lossy(&message[..end]).into_owned();
        let close = header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = answer(&head, body, &objects);
        socket.write_all(&response).await?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn reply(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn error(status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
    );
    reply(
        status,
        &[("Content-Type", "application/xml".into())],
        body.as_bytes(),
    )
}

fn answer(head: &str, body: Vec<u8>, objects: &Objects) -> Vec<u8> {
    let mut parts = head.split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/").split('?').next().unwrap_or("/");
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let _bucket = segments.next().unwrap_or("");
    let Some(key) = segments.next().filter(|k| !k.is_empty()) else {
        // Bucket-level calls (HeadBucket, CreateBucket): fine.
        return reply("200 OK", &[], b"");
    };
    let mut objects = objects.lock().unwrap();
    match method {
        "GET" | "HEAD" => match objects.get(key) {
            Some((data, etag)) => {
                let mut r = reply("200 OK", &[("ETag", etag.clone())], data);
                if method == "HEAD" {
                    r.truncate(r.len() - data.len());
                }
                r
            }
            None if method == "HEAD" => {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
            }
            None => error("404 Not Found", "NoSuchKey"),
        },
        "PUT" => {
            let current = objects.get(key).map(|(_, e)| e.clone());
            if header(head, "if-none-match") == Some("*") && current.is_some() {
                return error("412 Precondition Failed", "PreconditionFailed");
            }
            if let Some(want) = header(head, "if-match") {
                if current.as_deref() != Some(want) {
                    return error("412 Precondition Failed", "PreconditionFailed");
                }
            }
            let etag = format!("\"{:016x}\"", fxhash(&body));
            objects.insert(key.to_owned(), (body, etag.clone()));
            reply("200 OK", &[("ETag", etag)], b"")
        }
        "DELETE" => {
            objects.remove(key);
            reply("204 No Content", &[], b"")
        }
        _ => error("400 Bad Request", "NotImplemented"),
    }
}

fn fxhash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
