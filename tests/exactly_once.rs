//! Exactly once under contention: several writers on one key through two replicas of one
//! bucket, behind a proxy that loses a tenth of the answers to PUTs and DELETEs after S3
//! answered them. Every acknowledged command applied once and only once, every answer
//! possible in some order, and every `SERVER_ERROR` says that its outcome is unknown.
//! Final values are read through a third replica in strict mode, straight from S3.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering::SeqCst;

use common::binary::frame as binary_frame;
use common::proxy::{Mode, Proxy};
use common::{s3_endpoint, unique_prefix, Backend, Client, TestServer};
use s3cached::config::Config;
use s3cached::store::HISTORY_LEN;

/// Answers lost, in a thousand writes: the 10 %.
const LOST_PER_MILLE: u32 = 100;
/// Writers on the key, half through each replica.
const WRITERS: usize = 8;
/// At most this share of commands may answer `SERVER_ERROR` (outcome unknown), in percent.
const MAX_ERROR_PERCENT: usize = 1;

/// Two replicas behind one lossy proxy, and a strict replica straight on S3 to check with.
struct Replicas {
    proxy: Proxy,
    a: TestServer,
    b: TestServer,
    check: TestServer,
}

impl Replicas {
    async fn start(name: &str) -> Replicas {
        let proxy = Proxy::start(&s3_endpoint()).await;
        let prefix = unique_prefix(name);
        // Deadlines long enough for a loaded machine: the faults here are lost answers,
        // which fail at once, not slow ones.
        let tweak = |c: &mut Config| {
            c.s3_attempt_timeout_ms = 3_000;
            c.s3_operation_timeout_ms = 15_000;
            c.s3_max_attempts = 4;
        };
        let a = TestServer::behind_with(&proxy, &prefix, "", tweak).await;
        let b = TestServer::behind_with(&proxy, &prefix, "", tweak).await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::config(
            Backend::S3,
            &prefix,
            dir.path(),
            "revalidate_after_ms = 0\n",
        );
        let check = TestServer::start_config(config, dir).await;
        Replicas { proxy, a, b, check }
    }

    /// Writer `i`'s connection: even writers through A, odd through B.
    async fn writer(&self, i: usize) -> Client {
        if i.is_multiple_of(2) {
            self.a.client().await
        } else {
            self.b.client().await
        }
    }

    fn lose_answers(&self) {
        self.proxy.set(Mode::LoseWriteAnswers {
            per_mille: LOST_PER_MILLE,
        });
    }

    /// Stops losing answers; checks some were lost and settled by reading back, each found
    /// well within the history's bound. Returns the answers lost and the writes settled.
    async fn stop_losing(&self) -> (usize, u64) {
        self.proxy.set(Mode::Forward(std::time::Duration::ZERO));
        let lost = self.proxy.answers_lost.load(SeqCst);
        assert!(lost > 0, "the proxy lost no answer: nothing was tested");
        let (mut settled, mut depth) = (0, 0);
        for server in [&self.a, &self.b] {
            let mut c = server.client().await;
            settled += c.stat("s3_writes_settled_applied").await
                + c.stat("s3_writes_settled_not_applied").await
                + c.stat("s3_write_outcomes_unknown").await;
            depth = depth.max(c.stat("s3_write_settled_depth_max").await);
        }
        assert!(settled > 0, "{lost} answers lost and no write settled");
        assert!(
            depth < HISTORY_LEN as u64 / 2,
            "a write was found {depth} writes deep: the history bound is too close"
        );
        println!("deepest settlement: {depth} writes after ours");
        (lost, settled)
    }

    /// `key`'s value as S3 holds it now.
    async fn value(&self, key: &str) -> Option<String> {
        self.check.client().await.get_value(key).await
    }
}

/// One reply line, or for a meta `VA` reply its line and value joined by a space.
async fn reply(c: &mut Client) -> String {
    let mut got = String::from_utf8(c.read_until(b"\r\n").await).unwrap();
    if got.starts_with("VA ") && got.matches("\r\n").count() < 2 {
        got.push_str(&String::from_utf8(c.read_until(b"\r\n").await).unwrap());
    }
    got.trim_end().replace("\r\n", " ")
}

/// What the commands of a run answered: acknowledged values, and errors.
#[derive(Default)]
struct Answers {
    acked: Vec<String>,
    errors: Vec<String>,
}

impl Answers {
    fn add(&mut self, reply: String, ok: impl Fn(&str) -> bool) {
        if ok(&reply) {
            self.acked.push(reply);
        } else {
            assert!(
                reply.starts_with("SERVER_ERROR") && reply.contains("outcome unknown"),
                "an answer that is neither an acknowledgement nor an unknown outcome: {reply:?}"
            );
            self.errors.push(reply);
        }
    }

    /// The errors are few: at most [`MAX_ERROR_PERCENT`] of `commands`.
    fn few_errors(&self, commands: usize) {
        assert!(
            self.errors.len() * 100 <= commands * MAX_ERROR_PERCENT,
            "{} of {commands} commands answered an unknown outcome: {:?}",
            self.errors.len(),
            self.errors
        );
    }
}

/// A binary increment by 1 of a counter that exists (no create): the new value, or the
/// error's text.
async fn binary_incr(c: &mut Client, key: &str) -> String {
    let mut extras = Vec::new();
    extras.extend(1u64.to_be_bytes());
    extras.extend(0u64.to_be_bytes());
    extras.extend(u32::MAX.to_be_bytes());
    c.send(&binary_frame(0x05, key.as_bytes(), &extras, b"", 0, 7))
        .await;
    let header = c.read_exact(24).await;
    let status = u16::from_be_bytes([header[6], header[7]]);
    let body_len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
    let body = c.read_exact(body_len).await;
    if status == 0 {
        u64::from_be_bytes(body[..8].try_into().unwrap()).to_string()
    } else {
        format!(
            "SERVER_ERROR {status:#x} {}",
            String::from_utf8_lossy(&body)
        )
    }
}

#[tokio::test]
async fn counters_count_every_acknowledged_increment_once() {
    if !common::have_s3() {
        return;
    }
    const EACH: usize = 25;
    let r = Replicas::start("once-incr").await;
    r.a.client()
        .await
        .roundtrip(b"set n 0 0 1\r\n0\r\n", b"STORED\r\n")
        .await;
    r.lose_answers();
    // Classic incr, meta `ma` and binary increment, through both replicas.
    let writers = (0..WRITERS).map(|i| {
        let r = &r;
        async move {
            let mut c = r.writer(i).await;
            let mut replies = Vec::new();
            for _ in 0..EACH {
                let reply = match i % 4 {
                    0 | 1 => {
                        c.send(b"incr n 1\r\n").await;
                        reply(&mut c).await
                    }
                    2 => {
                        c.send(b"ma n v\r\n").await;
                        let r = reply(&mut c).await;
                        r.rsplit(' ').next().unwrap().to_owned()
                    }
                    _ => binary_incr(&mut c, "n").await,
                };
                replies.push(reply);
            }
            replies
        }
    });
    let mut answers = Answers::default();
    for reply in futures::future::join_all(writers)
        .await
        .into_iter()
        .flatten()
    {
        answers.add(reply, |r| r.parse::<u64>().is_ok());
    }
    let (lost, settled) = r.stop_losing().await;
    let total: u64 = r.value("n").await.unwrap().trim().parse().unwrap();
    let acked: Vec<u64> = answers.acked.iter().map(|v| v.parse().unwrap()).collect();
    // Every acknowledged increment saw its own value: none twice, none past the total.
    let distinct: HashSet<u64> = acked.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        acked.len(),
        "two increments answered one value"
    );
    assert!(acked.iter().all(|&v| (1..=total).contains(&v)));
    // Applied once: at least every acknowledged one, at most those and the unknown ones.
    let (n, errors) = (acked.len() as u64, answers.errors.len() as u64);
    assert!(
        (n..=n + errors).contains(&total),
        "{n} increments acknowledged, {errors} unknown, the counter is {total}"
    );
    answers.few_errors(WRITERS * EACH);
    println!(
        "incr: {n} acknowledged, {errors} unknown, total {total}; {lost} answers lost, \
         {settled} writes settled by reading back"
    );
}

#[tokio::test]
async fn appends_land_once_each() {
    if !common::have_s3() {
        return;
    }
    const EACH: usize = 15;
    let r = Replicas::start("once-append").await;
    r.a.client()
        .await
        .roundtrip(b"set s 0 0 1\r\n-\r\n", b"STORED\r\n")
        .await;
    r.lose_answers();
    // Writer i appends (or, every other writer, prepends) its own letter.
    let writers = (0..WRITERS).map(|i| {
        let r = &r;
        async move {
            let mut c = r.writer(i).await;
            let letter = (b'a' + i as u8) as char;
            let verb = if i % 4 < 2 { "append" } else { "prepend" };
            let mut answers = Answers::default();
            for _ in 0..EACH {
                c.send(format!("{verb} s 0 0 1\r\n{letter}\r\n").as_bytes())
                    .await;
                answers.add(reply(&mut c).await, |r| r == "STORED");
            }
            (letter, answers)
        }
    });
    let runs = futures::future::join_all(writers).await;
    let (lost, _) = r.stop_losing().await;
    let value = r.value("s").await.unwrap();
    let mut counts = BTreeMap::new();
    for ch in value.chars() {
        *counts.entry(ch).or_insert(0usize) += 1;
    }
    let mut errors = Answers::default();
    for (letter, answers) in &runs {
        let (n, unknown) = (answers.acked.len(), answers.errors.len());
        let landed = counts.get(letter).copied().unwrap_or(0);
        assert!(
            (n..=n + unknown).contains(&landed),
            "{letter}: {n} acknowledged, {unknown} unknown, {landed} in the value {value:?}"
        );
        errors.errors.extend(answers.errors.iter().cloned());
    }
    assert_eq!(counts.get(&'-'), Some(&1), "the first value stays once");
    errors.few_errors(WRITERS * EACH);
    println!(
        "append/prepend: value of {} bytes, {} unknown; {lost} answers lost",
        value.len(),
        errors.errors.len()
    );
}

#[tokio::test]
async fn concurrent_adds_store_exactly_one() {
    if !common::have_s3() {
        return;
    }
    const ROUNDS: usize = 10;
    const ADDERS: usize = 16;
    let r = Replicas::start("once-add").await;
    r.lose_answers();
    let mut errors = Answers::default();
    for round in 0..ROUNDS {
        let key = format!("add{round}");
        let adders = (0..ADDERS).map(|i| {
            let (r, key) = (&r, &key);
            async move {
                let mut c = r.writer(i).await;
                let value = format!("w{i:02}");
                c.send(format!("add {key} 0 0 3\r\n{value}\r\n").as_bytes())
                    .await;
                (value, reply(&mut c).await)
            }
        });
        let replies = futures::future::join_all(adders).await;
        let stored: Vec<&String> = replies
            .iter()
            .filter(|(_, reply)| reply == "STORED")
            .map(|(value, _)| value)
            .collect();
        for (_, reply) in &replies {
            errors.add(reply.clone(), |r| r == "STORED" || r == "NOT_STORED");
        }
        assert_eq!(stored.len(), 1, "round {round}: {replies:?}");
        r.proxy.set(Mode::Forward(std::time::Duration::ZERO));
        assert_eq!(
            r.value(&key).await.as_ref(),
            Some(stored[0]),
            "round {round}"
        );
        r.lose_answers();
    }
    let (lost, _) = r.stop_losing().await;
    errors.few_errors(ROUNDS * ADDERS);
    println!(
        "add: {ROUNDS} rounds of {ADDERS}, one STORED each; {} unknown; {lost} answers lost",
        errors.errors.len()
    );
}

#[tokio::test]
async fn cas_loops_apply_each_success_once() {
    if !common::have_s3() {
        return;
    }
    const EACH: usize = 8;
    /// Bounds a writer's tries (a cas that loses a race tries again).
    const MAX_TRIES: usize = 400;
    let r = Replicas::start("once-cas").await;
    r.a.client()
        .await
        .roundtrip(b"set c 0 0 1\r\n0\r\n", b"STORED\r\n")
        .await;
    r.lose_answers();
    let writers = (0..WRITERS).map(|i| {
        let r = &r;
        async move {
            let mut c = r.writer(i).await;
            let (mut answers, mut tries) = (Answers::default(), 0);
            while answers.acked.len() + answers.errors.len() < EACH {
                tries += 1;
                assert!(tries <= MAX_TRIES, "writer {i}: no progress");
                c.send(b"gets c\r\n").await;
                let got = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
                let mut lines = got.split("\r\n");
                let head: Vec<&str> = lines.next().unwrap().split(' ').collect();
                let value: u64 = lines.next().unwrap().trim().parse().unwrap();
                let next = (value + 1).to_string();
                c.send(format!("cas c 0 0 {} {}\r\n{next}\r\n", next.len(), head[4]).as_bytes())
                    .await;
                match reply(&mut c).await.as_str() {
                    "EXISTS" => continue,
                    other => answers.add(other.to_owned(), |r| r == "STORED"),
                }
            }
            answers
        }
    });
    let runs = futures::future::join_all(writers).await;
    let (lost, _) = r.stop_losing().await;
    let total: usize = r.value("c").await.unwrap().trim().parse().unwrap();
    let n: usize = runs.iter().map(|a| a.acked.len()).sum();
    let unknown: usize = runs.iter().map(|a| a.errors.len()).sum();
    assert!(
        (n..=n + unknown).contains(&total),
        "{n} cas acknowledged, {unknown} unknown, the counter is {total}"
    );
    let all = Answers {
        errors: runs.into_iter().flat_map(|a| a.errors).collect(),
        ..Answers::default()
    };
    all.few_errors(WRITERS * EACH);
    println!("cas: {n} acknowledged, {unknown} unknown, total {total}; {lost} answers lost");
}
