use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::client;

/// Kills the child even when an assertion fails first.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_its_address_and_serves_the_script() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("requests.json");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_bot-bottle-fixture"))
            .args(["--kind", "anthropic", "--listen", "127.0.0.1:0"])
            .args([
                "--expect-key",
                "test-key",
                "--write-file",
                "out.txt",
                "--content",
                "x",
            ])
            .arg("--record")
            .arg(&record)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ready["kind"], "anthropic");
    let base = ready["base_url"].as_str().unwrap();
    assert_eq!(base, format!("http://{}", ready["addr"].as_str().unwrap()));

    let reply = client::post(
        base,
        "/v1/messages",
        &[("x-api-key", "test-key")],
        &json!({"stream": false, "tools": [{"name": "write"}], "messages": []}),
    )
    .await;
    assert_eq!(
        reply.json()["content"][0]["input"],
        json!({"path": "out.txt", "content": "x"})
    );

    // SIGTERM flushes the record; keys are redacted in it.
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.0.wait().unwrap().success());
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let headers = recorded[0]["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-api-key", "<redacted>"])));
}
