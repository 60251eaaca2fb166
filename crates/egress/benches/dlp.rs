//! DLP scan throughput with the full gitleaks rule set and the built-in set, against plain
//! passes over the same corpus measured in the same run; then the built-in set's detection
//! figures on its case file (`tests/it/dlp_cases.rs`).
//!
//! `cargo bench -p bot-bottle-egress --bench dlp` scans a generated corpus (`-- --mib N`
//! sets its size, 16 by default); `-- --dir PATH` also scans the files under PATH as a
//! second corpus (real code, for instance `~/.cargo/registry/src`); `-- --rules PATH` adds
//! one more rule file to both measures (an older built-in set, for a before/after). One
//! core: the scans run on the calling thread.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bot_bottle_egress::dlp::{CustodySecret, DlpRules, Scanner};

#[path = "../tests/it/dlp_cases.rs"]
mod dlp_cases;

use dlp_cases::Rng;

const GITLEAKS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/testdata/gitleaks.toml"
);

fn main() {
    let mut mib = 16usize;
    let mut dir = None;
    let mut extra_rules = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            "--dir" => dir = args.next(),
            "--rules" => extra_rules = args.next(),
            // `cargo bench` passes `--bench`; anything else is ignored the same way.
            _ => {}
        }
    }

    let text = std::fs::read_to_string(GITLEAKS)
        .unwrap_or_else(|error| panic!("read {GITLEAKS}: {error}"));
    let started = Instant::now();
    let (rules, skipped) = DlpRules::from_gitleaks_toml(&text).expect("valid gitleaks file");
    let load_time = started.elapsed();
    let custody = vec![CustodySecret {
        name: "bench".to_owned(),
        value: "sk-bench-9f8e7d6c5b4a39281706f5e4d3c2b1a0".to_owned(),
        hosts: vec!["api.model.test".to_owned()],
    }];
    let gitleaks = Scanner::new(rules.clone(), custody.clone());
    let started = Instant::now();
    let builtin_rules = DlpRules::builtin();
    let builtin_load_time = started.elapsed();
    let builtin = Scanner::new(builtin_rules, custody.clone());
    let extra = extra_rules.map(|path| {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
        let (rules, _) = DlpRules::from_gitleaks_toml(&text).expect("valid rule file");
        (path, Scanner::new(rules, custody))
    });

    println!(
        "gitleaks rules: {} loaded, {} skipped, loaded in {load_time:?} (each regex compiled once to check it; kept compiled only once a scan needs it); built-in rules: {}, loaded in {builtin_load_time:?}",
        rules.len(),
        skipped.len(),
        builtin.rules().len()
    );
    let synthetic = corpus(mib << 20);
    let mut sets = vec![
        ("scan: full gitleaks set".to_owned(), &gitleaks),
        ("scan: built-in set".to_owned(), &builtin),
    ];
    if let Some((path, scanner)) = &extra {
        sets.push((format!("scan: {path}"), scanner));
    }
    report(
        "synthetic (text, JSON, code; keyword-dense)",
        &synthetic,
        &sets,
    );
    if let Some(dir) = dir {
        let mut docs = Vec::new();
        add_dir(&mut docs, std::path::Path::new(&dir));
        report(&format!("files under {dir}"), &docs, &sets);
    }

    let cases = dlp_cases::cases();
    println!("\ndetection on the built-in set's case file (tests/it/dlp_cases.rs):");
    for (name, scanner) in &sets {
        let score = dlp_cases::score(scanner, &cases);
        println!(
            "{}: {} ({} failures)",
            name.trim_start_matches("scan: "),
            score.summary(),
            score.failures.len()
        );
    }
}

fn report(name: &str, docs: &[Vec<u8>], sets: &[(String, &Scanner)]) {
    let total: usize = docs.iter().map(Vec::len).sum();
    #[expect(
        clippy::cast_precision_loss,
        reason = "corpus sizes are far below 2^52"
    )]
    let mb = total as f64 / 1e6;
    println!("\ncorpus: {name}: {} documents, {mb:.1} MB", docs.len());

    let memchr_time = best_of(3, || {
        let finder = memchr::memmem::Finder::new(b"-----BEGIN");
        docs.iter().map(|doc| finder.find_iter(doc).count()).sum()
    });
    let keywords = ["key", "secret", "token", "password", "akia", "ghp_"];
    let aho = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(keywords)
        .expect("small automaton");
    let aho_time = best_of(3, || {
        docs.iter().map(|doc| aho.find_iter(doc).count()).sum()
    });
    let mut timings = Vec::new();
    for (pass, scanner) in sets {
        let mut findings = 0;
        let time = best_of(3, || {
            findings = docs.iter().map(|doc| scanner.scan(doc).len()).sum();
            findings
        });
        timings.push((pass.clone(), time, findings));
    }

    let rate = |time: Duration| mb / time.as_secs_f64();
    let memchr_rate = rate(memchr_time);
    let aho_rate = rate(aho_time);
    println!(
        "{:<36} {:>9} {:>10} {:>9} {:>9}",
        "pass", "MB/s", "vs memchr", "vs aho", "findings"
    );
    let baselines = [
        ("memchr memmem (baseline)".to_owned(), memchr_time, 0),
        (
            "aho-corasick, 6 keywords (baseline)".to_owned(),
            aho_time,
            0,
        ),
    ];
    for (pass, time, findings) in baselines.iter().chain(timings.iter()) {
        println!(
            "{pass:<36} {:>9.1} {:>9.3}x {:>8.2}x {findings:>9}",
            rate(*time),
            rate(*time) / memchr_rate,
            rate(*time) / aho_rate
        );
    }
}

fn best_of(runs: usize, mut pass: impl FnMut() -> usize) -> Duration {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            black_box(pass());
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn add_dir(docs: &mut Vec<Vec<u8>>, dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            add_dir(docs, &path);
        } else if let Ok(bytes) = std::fs::read(&path)
            && !bytes.is_empty()
            && bytes.len() <= 8 << 20
        {
            docs.push(bytes);
        }
    }
}

/// The corpus's draws, on the case file's xorshift, so every run scans the same corpus.
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick_str<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const WORDS: &[&str] = &[
    "the", "a", "request", "should", "return", "error", "when", "user", "file", "value", "config",
    "build", "test", "and", "of", "to", "in", "is", "that", "for", "with", "on", "this", "we",
    "function", "module", "handler", "server", "client", "response", "update", "change", "fix",
    "issue", "branch", "commit", "review", "token", "key", "password", "secret", "session",
    "cache", "memory", "thread", "async", "parse", "input", "output", "string", "number", "list",
];

const IDENTS: &[&str] = &[
    "request",
    "response",
    "config",
    "api_key",
    "token",
    "session_id",
    "user",
    "items",
    "path",
    "buffer",
    "result",
    "secret_name",
    "password_hash",
    "access_level",
    "client",
    "headers",
];

fn sentence(rng: &mut Rng, out: &mut String) {
    let len = 6 + rng.below(14);
    for i in 0..len {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(rng.pick_str(WORDS));
    }
    out.push_str(". ");
}

fn random_token(rng: &mut Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len())]))
        .collect()
}

fn text_doc(rng: &mut Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 256);
    while out.len() < size {
        sentence(rng, &mut out);
        if rng.below(8) == 0 {
            out.push_str("\n\n");
        }
    }
    out
}

fn json_doc(rng: &mut Rng, size: usize) -> String {
    let mut out = String::from("{\"model\":\"claude-test\",\"max_tokens\":4096,\"messages\":[");
    while out.len() < size {
        let mut content = String::new();
        sentence(rng, &mut content);
        sentence(rng, &mut content);
        out.push_str(&format!(
            "{{\"role\":\"{}\",\"content\":[{{\"type\":\"text\",\"text\":\"{}\"}},{{\"type\":\"tool_use\",\"id\":\"toolu_{}\",\"name\":\"{}\",\"input\":{{\"{}\":\"{}\",\"line\":{}}}}}]}},",
            rng.pick_str(&["user", "assistant"]),
            content,
            random_token(rng, 24),
            rng.pick_str(&["read_file", "bash", "edit", "grep"]),
            rng.pick_str(IDENTS),
            rng.pick_str(WORDS),
            rng.below(5000)
        ));
    }
    out.push_str("{\"role\":\"user\",\"content\":\"done\"}]}");
    out
}

fn code_doc(rng: &mut Rng, size: usize) -> String {
    let mut out = String::with_capacity(size + 256);
    while out.len() < size {
        let name = rng.pick_str(IDENTS);
        match rng.below(6) {
            0 => out.push_str(&format!(
                "fn handle_{name}(input: &str) -> Result<String, Error> {{\n    let {name} = parse(input)?;\n    Ok({name}.to_string())\n}}\n\n"
            )),
            1 => out.push_str(&format!(
                "    let {name} = std::env::var(\"{}\").unwrap_or_default();\n",
                name.to_ascii_uppercase()
            )),
            2 => out.push_str(&format!(
                "def {name}_{}(self, {}):\n    return self.{}.get(\"{}\")\n\n",
                rng.pick_str(WORDS),
                rng.pick_str(IDENTS),
                rng.pick_str(IDENTS),
                rng.pick_str(WORDS)
            )),
            3 => out.push_str(&format!(
                "    // {} {} {}\n",
                rng.pick_str(WORDS),
                rng.pick_str(WORDS),
                rng.pick_str(WORDS)
            )),
            4 => out.push_str(&format!(
                "const {}_{}: &str = \"{}\";\n",
                name.to_ascii_uppercase(),
                rng.below(100),
                rng.pick_str(WORDS)
            )),
            _ => out.push_str(&format!(
                "    if {name}.len() > {} {{ return Err(Error::TooLong); }}\n",
                rng.below(1000)
            )),
        }
    }
    out
}

/// Text, JSON request bodies and code in equal parts, 4 to 64 KiB each, with a secret
/// planted about once per MiB.
fn corpus(total: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut docs = Vec::new();
    let mut size = 0;
    let mut next_secret = 1 << 20;
    while size < total {
        let target = (4 << 10) + rng.below(60 << 10);
        let mut doc = match docs.len() % 3 {
            0 => text_doc(&mut rng, target),
            1 => json_doc(&mut rng, target),
            _ => code_doc(&mut rng, target),
        };
        if size >= next_secret {
            next_secret += 1 << 20;
            let secret = match rng.below(3) {
                0 => format!(
                    "\naws_key = \"AKIA{}\"\n",
                    random_token(&mut rng, 16).to_ascii_uppercase()
                ),
                1 => format!(
                    "\ngit remote add x https://ghp_{}@forge.test/o/r\n",
                    random_token(&mut rng, 36)
                ),
                _ => format!(
                    "\nSLACK=xoxb-{}-{}\n",
                    rng.below(1_000_000_000),
                    random_token(&mut rng, 24)
                ),
            };
            let at = doc.len() / 2;
            let at = (0..=at)
                .rev()
                .find(|&i| doc.is_char_boundary(i))
                .unwrap_or(0);
            doc.insert_str(at, &secret);
        }
        size += doc.len();
        docs.push(doc.into_bytes());
    }
    docs
}
