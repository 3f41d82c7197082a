//! A command run with the new count (`scale_command = "scripts/scale.sh {replicas}"`, through
//! `sh -c`), within a timeout; a non-zero exit is an error with the command's last output.

use std::process::Stdio;
use std::time::Duration;

use super::Scale;

/// The command actuator.
pub struct Command {
    template: String,
    timeout: Duration,
}

impl Command {
    pub fn new(template: String, timeout: Duration) -> Self {
        Self { template, timeout }
    }

    /// The command line for `replicas`.
    pub fn line(&self, replicas: u32) -> String {
        self.template.replace("{replicas}", &replicas.to_string())
    }
}

impl Scale for Command {
    async fn current(&mut self) -> Result<Option<u32>, String> {
        Ok(None)
    }

    async fn set(&mut self, replicas: u32) -> Result<(), String> {
        let line = self.line(replicas);
        let child = tokio::process::Command::new("sh")
            .args(["-c", &line])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {line:?}: {e}"))?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| format!("{line:?} did not finish in {:?} (killed)", self.timeout))?
            .map_err(|e| format!("{line:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let tail: String = text
            .trim()
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!("{line:?} exited with {}: {tail}", out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_count_is_substituted_and_a_failure_carries_the_output() {
        let mut ok = Command::new("test {replicas} -eq 3".into(), Duration::from_secs(5));
        assert_eq!(ok.line(3), "test 3 -eq 3");
        assert_eq!(ok.set(3).await, Ok(()));
        let e = ok.set(2).await.unwrap_err();
        assert!(e.contains("exit status: 1"), "{e}");
        let mut loud = Command::new(
            "echo no room for {replicas} >&2; exit 7".into(),
            Duration::from_secs(5),
        );
        let e = loud.set(4).await.unwrap_err();
        assert!(e.contains("no room for 4") && e.contains("7"), "{e}");
        let mut slow = Command::new("sleep 5 # {replicas}".into(), Duration::from_millis(200));
        assert!(slow.set(1).await.unwrap_err().contains("did not finish"));
    }
}
