//! What the control-plane binaries' own tests share (feature `test-support`): running a binary
//! to its end, starting one that serves (it prints `NAME ready http=ADDR`), raw HTTP/1.1
//! requests over a real socket, and waiting for a condition with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `bin` with `args` (without `config_env` in its environment) to its end: whether it
/// succeeded, and its stdout and stderr together.
pub fn run(bin: &str, config_env: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .env_remove(config_env)
        .output()
        .expect("run the binary");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A serving binary, killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` with `args` and waits for its ready line: the address it serves on.
pub fn start(bin: &str, args: &[&str]) -> (String, Running) {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("a piped stdout"))
        .read_line(&mut line)
        .expect("its ready line");
    let running = Running(child);
    let addr = line
        .split_once(" ready http=")
        .map(|(_, a)| a.trim().to_string())
        .unwrap_or_else(|| panic!("no ready line, got {line:?}"));
    (addr, running)
}

/// Sends `request` (a whole HTTP/1.1 request) to `addr`; the whole answer.
pub fn raw_http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}

/// One request with a JSON `body` (closing the connection): the status and the answer's body.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let body = body.unwrap_or("");
    let raw = raw_http(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        raw.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string()),
    )
}

/// Waits up to 15 s for `check`.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `bin` with each config of `cases` (TOML text, a word its error must contain) and
/// checks that it refuses to run, saying why; then with a config file that does not exist.
pub fn assert_configs_refused<T: AsRef<str>>(bin: &str, config_env: &str, cases: &[(T, &str)]) {
    let name = bin.rsplit('/').next().unwrap_or(bin);
    let dir = std::env::temp_dir().join(format!("{name}-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    for (i, (toml, why)) in cases.iter().enumerate() {
        let toml = toml.as_ref();
        let path = dir.join(format!("{i}.toml"));
        std::fs::write(&path, toml).expect("write the config");
        let (ok, text) = run(
            bin,
            config_env,
            &["--config", path.to_str().expect("a UTF-8 path")],
        );
        assert!(!ok, "started with {toml:?}");
        assert!(text.contains(why), "{toml:?}: expected {why:?} in:\n{text}");
    }
    let (ok, text) = run(bin, config_env, &["--config", "/nonexistent.toml"]);
    assert!(!ok && text.contains("/nonexistent.toml"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}
