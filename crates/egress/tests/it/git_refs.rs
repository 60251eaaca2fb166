//! A git rule's `push_refs`: real `git push` commands through the gateway to `git
//! http-backend`, with the forge token in custody, held to `refs/heads/bot-bottle/*`.

use std::path::{Path, PathBuf};

use bot_bottle_core::credential::Inject;
use bot_bottle_egress::{GatewayConfig, OverCap};

use crate::clients::{GIT_TOKEN, bare_repo, git_backend, git_ok, run};
use crate::support::{TestGateway, TestPki, curl, policy, tls_gateway_with, tls_origin, traffic};

const SCOPED: &str = "audit: all\nrules:\n  - host: git.test\n    git: {repo: owner/name, fetch: true, push: true, push_refs: [\"refs/heads/bot-bottle/*\"]}\n";

struct Forge {
    ca: String,
    gw: TestGateway,
    root: PathBuf,
    work: PathBuf,
    git_config: Vec<String>,
    placeholder: String,
    _dir: tempfile::TempDir,
}

impl Forge {
    async fn start(rules: &str) -> Forge {
        Forge::start_with(
            rules,
            |root, work| {
                bare_repo(root, work, "owner/name");
                bare_repo(root, work, "owner/other");
            },
            |_| {},
        )
        .await
    }

    async fn start_with(
        rules: &str,
        repos: impl FnOnce(&Path, &Path),
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Forge {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repos");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("mkdir");
        repos(&root, &work);
        let origin = tls_origin(&pki, &["git.test"], Some(git_backend(root.clone()))).await;
        let rules = policy(rules);
        let gitea = crate::mitm::credential(
            "gitea",
            "git.test",
            Inject::Basic {
                username: "bot".into(),
            },
            GIT_TOKEN,
        );
        let placeholder = gitea.placeholder().to_string();
        let (gw, ca) =
            tls_gateway_with(rules, &[("git.test", origin)], &pki, vec![gitea], tweak).await;
        let git_config = vec![
            "-c".to_string(),
            format!("http.proxy={}", gw.proxy_url()),
            "-c".to_string(),
            format!("http.sslCAInfo={}", ca.to_str().expect("utf8")),
        ];
        Forge {
            ca: ca.to_str().expect("utf8").to_string(),
            gw,
            root,
            work,
            git_config,
            placeholder,
            _dir: dir,
        }
    }

    fn url(&self, repo: &str) -> String {
        format!("https://bot:{}@git.test/{repo}.git", self.placeholder)
    }

    /// Runs git through the gateway off the async workers (the gateway runs on them).
    async fn git(&self, dir: &Path, args: &[&str]) -> std::process::Output {
        let mut all = self.git_config.clone();
        all.extend(args.iter().map(|a| (*a).to_string()));
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            run(&dir, &args)
        })
        .await
        .expect("join")
    }

    async fn git_ok(&self, dir: &Path, args: &[&str]) {
        let out = self.git(dir, args).await;
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn git_refused(&self, dir: &Path, args: &[&str]) {
        let out = self.git(dir, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "git {args:?} must be refused: {stderr}"
        );
        assert!(stderr.contains("403"), "git {args:?}: {stderr}");
        assert!(!stderr.contains(GIT_TOKEN));
    }

    /// A clone of `owner/name` with one new commit on top of `main`.
    async fn checkout(&self) -> PathBuf {
        self.git_ok(
            &self.work,
            &["clone", "-q", &self.url("owner/name"), "name"],
        )
        .await;
        let checkout = self.work.join("name");
        std::fs::write(checkout.join("change"), "x\n").expect("write");
        git_ok(&checkout, &["add", "change"]);
        git_ok(&checkout, &["commit", "-q", "-m", "change"]);
        checkout
    }

    /// The ref in the served bare repository, if it exists.
    /// Pushes HEAD to the run's branch, which lands at `head`, then to `main`, which is
    /// refused and stays at `main_before`.
    async fn run_branch_lands_and_main_is_refused(
        &self,
        checkout: &Path,
        head: String,
        main_before: Option<String>,
    ) {
        self.git_ok(checkout, &["push", "-q", "origin", "HEAD:bot-bottle/run-1"])
            .await;
        assert_eq!(
            self.served_ref("owner/name", "refs/heads/bot-bottle/run-1"),
            Some(head)
        );
        self.git_refused(checkout, &["push", "origin", "HEAD:main"])
            .await;
        assert_eq!(
            self.served_ref("owner/name", "refs/heads/main"),
            main_before
        );
    }

    fn served_ref(&self, repo: &str, name: &str) -> Option<String> {
        let out = run(
            &self.root.join(format!("{repo}.git")),
            &["rev-parse", "-q", "--verify", name],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The block events for receive-pack POSTs.
    fn push_blocks(&self) -> Vec<serde_json::Value> {
        traffic(&self.gw.audit_path)
            .into_iter()
            .filter(|e| e["decision"] == "block" && e["method"] == "POST")
            .collect()
    }
}

#[tokio::test]
async fn the_run_branch_is_pushed_and_other_refs_are_refused_with_an_audit_line() {
    let forge = Forge::start(SCOPED).await;
    let checkout = forge.checkout().await;
    let head = git_ok(&checkout, &["rev-parse", "HEAD"]).trim().to_string();
    let main_before = forge.served_ref("owner/name", "refs/heads/main");
    assert!(main_before.is_some());

    // The run's branch: created, then updated.
    forge
        .git_ok(
            &checkout,
            &["push", "-q", "origin", "HEAD:bot-bottle/run-1"],
        )
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/bot-bottle/run-1"),
        Some(head.clone())
    );
    std::fs::write(checkout.join("change"), "y\n").expect("write");
    git_ok(&checkout, &["commit", "-q", "-am", "again"]);
    let head = git_ok(&checkout, &["rev-parse", "HEAD"]).trim().to_string();
    forge
        .git_ok(
            &checkout,
            &["push", "-q", "origin", "HEAD:bot-bottle/run-1"],
        )
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/bot-bottle/run-1"),
        Some(head.clone())
    );
    assert!(forge.push_blocks().is_empty(), "{:?}", forge.push_blocks());
    let allowed: Vec<serde_json::Value> = traffic(&forge.gw.audit_path)
        .into_iter()
        .filter(|e| e["decision"] == "allow" && e["method"] == "POST")
        .filter(|e| e["path"] == "/owner/name.git/git-receive-pack")
        .collect();
    assert!(!allowed.is_empty());
    assert!(
        allowed.iter().all(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("refs/heads/bot-bottle/run-1"))),
        "the audit names the pushed ref: {allowed:?}"
    );

    // `main` is refused, and stays where it was.
    forge
        .git_refused(&checkout, &["push", "origin", "HEAD:main"])
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/main"),
        main_before
    );
    let blocks = forge.push_blocks();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["reason"], "git-ref-not-allowed");
    assert_eq!(blocks[0]["status"], 403);
    assert_eq!(blocks[0]["path"], "/owner/name.git/git-receive-pack");
    let detail = blocks[0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains("refs/heads/main (not in push_refs)"),
        "{detail}"
    );

    // Deleting the run's branch is refused: it is still there.
    forge
        .git_refused(&checkout, &["push", "origin", ":bot-bottle/run-1"])
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/bot-bottle/run-1"),
        Some(head.clone())
    );
    let blocks = forge.push_blocks();
    let detail = blocks.last().expect("a block")["detail"]
        .as_str()
        .expect("detail")
        .to_string();
    assert!(
        detail.contains("refs/heads/bot-bottle/run-1 (delete)"),
        "{detail}"
    );

    // A tag is refused.
    git_ok(&checkout, &["tag", "v1"]);
    forge
        .git_refused(&checkout, &["push", "origin", "v1"])
        .await;
    assert_eq!(forge.served_ref("owner/name", "refs/tags/v1"), None);
    let blocks = forge.push_blocks();
    let detail = blocks.last().expect("a block")["detail"]
        .as_str()
        .expect("detail")
        .to_string();
    assert!(detail.contains("refs/tags/v1 (tag)"), "{detail}");

    // One push naming an allowed and a refused ref is refused whole.
    forge
        .git_refused(
            &checkout,
            &["push", "origin", "HEAD:bot-bottle/run-2", "HEAD:main"],
        )
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/bot-bottle/run-2"),
        None
    );
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/main"),
        main_before
    );
    let blocks = forge.push_blocks();
    assert_eq!(blocks.len(), 4, "{blocks:?}");
    let detail = blocks[3]["detail"].as_str().expect("detail");
    assert!(detail.contains("refs/heads/main"), "{detail}");
    assert!(blocks.iter().all(|e| e["reason"] == "git-ref-not-allowed"));

    let audit = std::fs::read_to_string(&forge.gw.audit_path).expect("audit");
    assert!(!audit.contains(GIT_TOKEN));
    forge.gw.handle.shutdown().await;
}

#[tokio::test]
async fn a_push_to_another_repository_is_refused() {
    let forge = Forge::start(SCOPED).await;
    let checkout = forge.checkout().await;
    let other_url = forge.url("owner/other");
    let before = forge.served_ref("owner/other", "refs/heads/main");
    forge
        .git_refused(
            &checkout,
            &["push", &other_url, "HEAD:refs/heads/bot-bottle/run-1"],
        )
        .await;
    assert_eq!(
        forge.served_ref("owner/other", "refs/heads/bot-bottle/run-1"),
        None
    );
    assert_eq!(forge.served_ref("owner/other", "refs/heads/main"), before);
    let blocks: Vec<serde_json::Value> = traffic(&forge.gw.audit_path)
        .into_iter()
        .filter(|e| e["decision"] == "block")
        .collect();
    assert!(!blocks.is_empty());
    assert!(
        blocks.iter().all(|e| e["reason"] == "git-repo-not-allowed"
            && e["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/owner/other.git/"))),
        "{blocks:?}"
    );
    forge.gw.handle.shutdown().await;
}

#[tokio::test]
async fn a_broad_host_rule_does_not_widen_push_refs() {
    let forge = Forge::start(&format!("{SCOPED}  - host: git.test\n")).await;
    let checkout = forge.checkout().await;
    let main_before = forge.served_ref("owner/name", "refs/heads/main");
    forge
        .git_ok(
            &checkout,
            &["push", "-q", "origin", "HEAD:bot-bottle/run-1"],
        )
        .await;
    forge
        .git_refused(&checkout, &["push", "origin", "HEAD:main"])
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/main"),
        main_before
    );
    let blocks = forge.push_blocks();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["reason"], "git-ref-not-allowed");

    // A hand-made, gzip-encoded push to a spelling of the repository that no git rule
    // parses (`%6d` is `m`): the broad rule allows the request, the push scope holds it
    // to no ref at all.
    let old = main_before.expect("main exists");
    let line = format!("{old} {old} refs/heads/main\0report-status\n");
    let mut raw = format!("{:04x}", line.len() + 4).into_bytes();
    raw.extend_from_slice(line.as_bytes());
    raw.extend_from_slice(b"0000");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &raw).expect("in memory");
    let body_path = forge.work.join("push.gz");
    std::fs::write(&body_path, encoder.finish().expect("in memory")).expect("write");
    let result = curl(
        &forge.gw.proxy_url(),
        &[
            "--cacert",
            &forge.ca,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/x-git-receive-pack-request",
            "-H",
            "Content-Encoding: gzip",
            "--data-binary",
            &format!("@{}", body_path.to_str().expect("utf8")),
            "https://git.test/owner/na%6de.git/git-receive-pack",
        ],
    )
    .await;
    assert_eq!(
        result.status,
        403,
        "{} {} {:?}",
        result.body,
        result.headers,
        traffic(&forge.gw.audit_path).last()
    );
    assert_eq!(
        result.header("x-bot-bottle-block").as_deref(),
        Some("git-ref-not-allowed")
    );
    assert!(result.body.contains("refs/heads/main"), "{}", result.body);

    // The same body as a GET that asks to be read as a POST: the method does not take
    // a request to a receive-pack endpoint out of the scope.
    let result = curl(
        &forge.gw.proxy_url(),
        &[
            "--cacert",
            &forge.ca,
            "-X",
            "GET",
            "-H",
            "X-HTTP-Method-Override: POST",
            "-H",
            "Content-Encoding: gzip",
            "--data-binary",
            &format!("@{}", body_path.to_str().expect("utf8")),
            "https://git.test/owner/name.git/git-receive-pack",
        ],
    )
    .await;
    assert_eq!(result.status, 403, "{}", result.body);
    assert_eq!(
        result.header("x-bot-bottle-block").as_deref(),
        Some("git-ref-not-allowed")
    );

    // The same body to the fetch endpoint, with a path-override header naming the push
    // endpoint: an origin that honours the header would run the push, so it is scoped.
    let result = curl(
        &forge.gw.proxy_url(),
        &[
            "--cacert",
            &forge.ca,
            "-H",
            "X-Original-URL: /owner/name.git/git-receive-pack",
            "-H",
            "Content-Encoding: gzip",
            "--data-binary",
            &format!("@{}", body_path.to_str().expect("utf8")),
            "https://git.test/owner/name.git/git-upload-pack",
        ],
    )
    .await;
    assert_eq!(result.status, 403, "{}", result.body);
    assert_eq!(
        result.header("x-bot-bottle-block").as_deref(),
        Some("git-ref-not-allowed")
    );
    assert_eq!(forge.served_ref("owner/name", "refs/heads/main"), Some(old));
    forge.gw.handle.shutdown().await;
}

/// `root/owner/name.git` with SHA-256 object ids, push options advertised, one commit.
fn sha256_repo(root: &Path, work: &Path) {
    let bare = root.join("owner/name.git");
    std::fs::create_dir_all(&bare).expect("mkdir");
    git_ok(
        &bare,
        &[
            "init",
            "-q",
            "--bare",
            "--object-format=sha256",
            "-b",
            "main",
        ],
    );
    git_ok(&bare, &["config", "http.receivepack", "true"]);
    git_ok(&bare, &["config", "receive.advertisePushOptions", "true"]);
    let seed = work.join("seed");
    std::fs::create_dir_all(&seed).expect("mkdir");
    git_ok(
        &seed,
        &["init", "-q", "--object-format=sha256", "-b", "main"],
    );
    std::fs::write(seed.join("README"), "hello\n").expect("write");
    git_ok(&seed, &["add", "README"]);
    git_ok(&seed, &["commit", "-q", "-m", "seed"]);
    git_ok(&seed, &["push", "-q", bare.to_str().expect("utf8"), "main"]);
}

#[tokio::test]
async fn sha256_ids_push_options_and_large_pushes_from_real_git_are_read() {
    let forge = Forge::start_with(SCOPED, sha256_repo, |_| {}).await;
    let checkout = forge.checkout().await;
    let head = git_ok(&checkout, &["rev-parse", "HEAD"]).trim().to_string();
    assert_eq!(head.len(), 64, "a SHA-256 repository: {head}");
    let main_before = forge.served_ref("owner/name", "refs/heads/main");

    // Push options follow the commands after their own flush.
    forge
        .git_ok(
            &checkout,
            &[
                "push",
                "-q",
                "-o",
                "ci.skip",
                "origin",
                "HEAD:bot-bottle/run-1",
            ],
        )
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/bot-bottle/run-1"),
        Some(head)
    );
    forge
        .git_refused(&checkout, &["push", "-o", "ci.skip", "origin", "HEAD:main"])
        .await;
    assert_eq!(
        forge.served_ref("owner/name", "refs/heads/main"),
        main_before
    );

    // Over `http.postBuffer` (1 MiB) git first sends a probe (a lone flush), then the
    // push in chunks; both pass, and the push lands.
    commit_big(&checkout);
    let head = git_ok(&checkout, &["rev-parse", "HEAD"]).trim().to_string();
    forge
        .run_branch_lands_and_main_is_refused(&checkout, head, main_before.clone())
        .await;
    let blocks = forge.push_blocks();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let pushes: Vec<serde_json::Value> = traffic(&forge.gw.audit_path)
        .into_iter()
        .filter(|e| e["decision"] == "allow" && e["path"] == "/owner/name.git/git-receive-pack")
        .collect();
    assert!(
        pushes.iter().any(|e| e["bytes_up"] == 4),
        "the probe went through: {pushes:?}"
    );
    assert!(
        pushes
            .iter()
            .any(|e| e["bytes_up"].as_u64().is_some_and(|n| n > 1 << 20)),
        "the large push went through: {pushes:?}"
    );
    assert!(
        blocks.iter().all(|e| e["reason"] == "git-ref-not-allowed"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("refs/heads/main"))),
        "{blocks:?}"
    );
    forge.gw.handle.shutdown().await;
}

/// Commits about 3 MiB of hex noise (a pack of about 1.5 MiB, over `http.postBuffer`).
fn commit_big(checkout: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: String = (0..(3 << 20) / 16)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("{state:016x}")
        })
        .collect();
    std::fs::write(checkout.join("big"), noise).expect("write");
    git_ok(checkout, &["add", "big"]);
    git_ok(checkout, &["commit", "-q", "-m", "big"]);
}

#[tokio::test]
async fn a_push_over_the_scan_cap_is_judged_from_its_start() {
    // The gateway buffers 64 KiB and passes the rest unscanned: the commands come first.
    let forge = Forge::start_with(
        SCOPED,
        |root, work| bare_repo(root, work, "owner/name"),
        |config| {
            config.dlp_body_cap = 64 << 10;
            config.dlp_over_cap = OverCap::Pass;
        },
    )
    .await;
    let checkout = forge.checkout().await;
    commit_big(&checkout);
    let head = git_ok(&checkout, &["rev-parse", "HEAD"]).trim().to_string();
    let main_before = forge.served_ref("owner/name", "refs/heads/main");
    forge
        .run_branch_lands_and_main_is_refused(&checkout, head, main_before.clone())
        .await;
    let blocks = forge.push_blocks();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["reason"], "git-ref-not-allowed");
    forge.gw.handle.shutdown().await;
}
