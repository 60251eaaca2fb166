//! Cases for the built-in DLP rule set: generated true positives of every token family the
//! set covers (modelled on the kinds of cases in gitleaks' rule generators: a token of the
//! provider's documented shape, in config, source and JSON lines) and hand-written false
//! positives (placeholders, documentation values, look-alikes, ordinary code and prose).
//!
//! Every token is generated at run time from a fixed seed, so no file in the repository holds
//! anything shaped like a live credential. Shared by the `it` test (`dlp_rules.rs`), which
//! holds the figures, and the `dlp` benchmark, which prints them.

use bot_bottle_egress::dlp::{Action, Scanner};

/// One case: a line of text and the rule that should find the secret in it (`None` for a
/// false positive: nothing may block).
#[derive(Debug, Clone)]
pub struct Case {
    pub text: String,
    pub expected: Option<&'static str>,
}

/// The figures over a set of cases.
#[derive(Debug, Default)]
pub struct Score {
    pub positives: usize,
    /// Positives where some rule found something.
    pub detected: usize,
    /// Positives where a finding blocks.
    pub blocked: usize,
    /// Positives where the expected rule is among the findings.
    pub expected_rule: usize,
    pub negatives: usize,
    /// False positives that some finding blocks.
    pub negatives_blocked: usize,
    /// False positives with any finding (log included).
    pub negatives_found: usize,
    /// Positives nothing found, and negatives something blocked: `(expected, text, found)`.
    pub failures: Vec<(String, String, Vec<String>)>,
}

#[expect(clippy::cast_precision_loss, reason = "case counts are small")]
fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    100.0 * part as f64 / whole as f64
}

impl Score {
    pub fn recall(&self) -> f64 {
        percent(self.detected, self.positives)
    }
    pub fn blocked_rate(&self) -> f64 {
        percent(self.blocked, self.positives)
    }
    pub fn expected_rate(&self) -> f64 {
        percent(self.expected_rule, self.positives)
    }
    pub fn false_blocked_rate(&self) -> f64 {
        percent(self.negatives_blocked, self.negatives)
    }
    pub fn summary(&self) -> String {
        format!(
            "{} true positives: {:.1}% detected, {:.1}% blocked, {:.1}% by the expected rule; {} false positives: {:.1}% blocked, {:.1}% logged or blocked",
            self.positives,
            self.recall(),
            self.blocked_rate(),
            self.expected_rate(),
            self.negatives,
            self.false_blocked_rate(),
            percent(self.negatives_found, self.negatives)
        )
    }
}

/// Runs every case through `scanner`.
pub fn score(scanner: &Scanner, cases: &[Case]) -> Score {
    let mut score = Score::default();
    for case in cases {
        let findings = scanner.scan(case.text.as_bytes());
        let ids: Vec<String> = findings.iter().map(|f| f.rule_id.clone()).collect();
        let blocks = findings.iter().any(|f| f.action == Action::Block);
        match case.expected {
            Some(expected) => {
                score.positives += 1;
                if !findings.is_empty() {
                    score.detected += 1;
                } else {
                    score
                        .failures
                        .push((expected.to_owned(), case.text.clone(), ids.clone()));
                }
                if blocks {
                    score.blocked += 1;
                }
                if ids.iter().any(|id| id == expected) {
                    score.expected_rule += 1;
                }
            }
            None => {
                score.negatives += 1;
                if !findings.is_empty() {
                    score.negatives_found += 1;
                }
                if blocks {
                    score.negatives_blocked += 1;
                    score
                        .failures
                        .push(("none".to_owned(), case.text.clone(), ids));
                }
            }
        }
    }
    score
}

/// Deterministic xorshift, so every run builds the same cases (the dlp bench, which
/// includes this file, builds its corpus with it too).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick(&mut self, alphabet: &[u8]) -> char {
        let index = usize::try_from(self.next() % alphabet.len() as u64).unwrap_or(0);
        char::from(alphabet[index])
    }

    fn string(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| self.pick(alphabet)).collect()
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const HEX: &[u8] = b"0123456789abcdef";
const UPPER_HEX: &[u8] = b"0123456789ABCDEF";
const DIGITS: &[u8] = b"0123456789";
const WORD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BECH32_UPPER: &[u8] = b"QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L";
const BASE32_UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const A_TO_H_HEX: &[u8] = b"abcdefgh0123456789";

/// Expands a token template: `{cN}` is N characters of class `c` (see the match below),
/// `{U}` a lowercase UUID, `{V}` an uppercase one; anything else is literal.
fn expand(rng: &mut Rng, template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open
            + rest[open..]
                .find('}')
                .expect("template braces are balanced");
        let spec = &rest[open + 1..close];
        let (class, count) = spec.split_at(1);
        let count: usize = count.parse().unwrap_or(0);
        let alphabet: &[u8] = match class {
            "a" => ALNUM,
            "l" => LOWER_ALNUM,
            "u" => UPPER_ALNUM,
            "h" => HEX,
            "H" => UPPER_HEX,
            "d" => DIGITS,
            "w" => WORD,
            "b" => BASE64,
            "L" => LETTERS,
            "B" => BECH32_UPPER,
            "A" => BASE32_UPPER,
            "g" => A_TO_H_HEX,
            "U" | "V" => {
                let uuid = [8, 4, 4, 4, 12]
                    .iter()
                    .map(|&len| rng.string(HEX, len))
                    .collect::<Vec<_>>()
                    .join("-");
                out.push_str(&if class == "V" {
                    uuid.to_ascii_uppercase()
                } else {
                    uuid
                });
                rest = &rest[close + 1..];
                continue;
            }
            other => panic!("unknown template class `{other}`"),
        };
        out.push_str(&rng.string(alphabet, count));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// How a secret appears: `{i}` the identifier, `{I}` it in capitals, `{s}` the secret.
const CONTEXTS: &[&str] = &[
    "{i}_api_token = \"{s}\"",
    "export {I}_TOKEN={s}",
    "{\n  \"{i}_token\": \"{s}\"\n}",
    "{i}_token: '{s}'",
    "{i}_token: {s}",
    "var {i}Token string = \"{s}\"",
    "{i}Token := `{s}`",
    "System.setProperty(\"{I}_TOKEN\", \"{s}\")",
    "{\"config.ini\": \"{I}_TOKEN={s}\\nDEBUG=false\"}",
    "<{i}Token>\n    {s}\n</{i}Token>",
    "{I}_TOKEN ?= \"{s}\"",
    "  \"{i}Token\" => \"{s}\"",
    "String {i}Token = \"{s}\";",
    "${i}Token .= \"{s}\"",
    "{i}Token = '{s}'",
];

/// How a token that identifies itself appears with no name next to it.
const BARE_CONTEXTS: &[&str] = &[
    "curl -sS -H \"Authorization: Bearer {s}\" https://api.example.test/v1/me",
    "{\"messages\":[{\"role\":\"user\",\"content\":\"deploy with {s} and report back\"}]}",
    "# copied from the dashboard: {s}\n",
    "git remote add origin https://x-access-token:{s}@forge.example.test/o/r.git",
    "The key you asked for is {s}.",
];

/// `(expected rule, identifier, token template, identifies itself)`.
const FAMILIES: &[(&str, &str, &str, bool)] = &[
    ("aws-access-key-id", "aws", "AKIA{A16}", true),
    ("aws-access-key-id", "aws", "ASIA{A16}", true),
    ("aws-secret-access-key", "aws_secret", "{a20}/{b19}", false),
    ("aws-bedrock-api-key", "bedrock", "ABSK{b120}", true),
    ("google-api-key", "gcp", "AIzaSy{w33}", true),
    ("azure-ad-client-secret", "azure", "{a3}8Q~{a34}", true),
    ("alibaba-access-key-id", "alibaba", "LTAI{a20}", true),
    ("alibaba-secret-key", "alibaba", "{l30}", false),
    ("digitalocean-token", "do", "dop_v1_{h64}", true),
    ("digitalocean-token", "do", "doo_v1_{h64}", true),
    ("digitalocean-token", "do", "dor_v1_{h64}", true),
    ("cloudflare-origin-ca-key", "cf", "v1.0-{h24}-{h146}", true),
    ("cloudflare-api-token", "cloudflare", "{w40}", false),
    ("cloudflare-api-token", "cloudflare", "{h37}", false),
    ("databricks-token", "databricks", "dapi{h32}", true),
    ("flyio-token", "fly", "fo1_{w43}", true),
    ("flyio-token", "fly", "fm2_{b120}", true),
    ("heroku-api-key-v2", "heroku", "HRKU-AA{w58}", true),
    ("heroku-api-key", "heroku", "{U}", false),
    ("hashicorp-vault-token", "vault", "hvs.{w100}", true),
    ("hashicorp-vault-token", "vault", "hvb.{w140}", true),
    (
        "hashicorp-vault-legacy-token",
        "vault",
        "s.{d1}{a23}",
        false,
    ),
    ("hashicorp-tf-api-token", "tfe", "{l14}.atlasv1.{w64}", true),
    ("openshift-user-token", "openshift", "sha256~{w43}", true),
    ("pulumi-api-token", "pulumi", "pul-{h40}", true),
    ("planetscale-token", "pscale", "pscale_tkn_{w43}", true),
    ("planetscale-token", "pscale", "pscale_pw_{w43}", true),
    ("scalingo-api-token", "scalingo", "tk-us-{w48}", true),
    (
        "clickhouse-cloud-api-secret",
        "clickhouse",
        "4b1d{a38}",
        true,
    ),
    (
        "dynatrace-api-token",
        "dynatrace",
        "dt0c01.{u24}.{u64}",
        true,
    ),
    ("doppler-token", "doppler", "dp.pt.{a43}", true),
    ("doppler-token", "doppler", "dp.st.{a43}", true),
    ("yandex-token", "yandex", "YC{w38}", false),
    ("yandex-api-key", "yandex", "AQVN{w36}", true),
    (
        "anthropic-api-key",
        "anthropic",
        "sk-ant-api03-{w93}AA",
        true,
    ),
    (
        "anthropic-api-key",
        "anthropic",
        "sk-ant-admin01-{w93}AA",
        true,
    ),
    ("openai-api-key", "openai", "sk-{a20}T3BlbkFJ{a20}", true),
    (
        "openai-project-key",
        "openai",
        "sk-proj-{w74}T3BlbkFJ{w74}",
        true,
    ),
    ("huggingface-token", "hf", "hf_{L34}", true),
    ("huggingface-token", "hf", "api_org_{L34}", true),
    ("perplexity-api-key", "pplx", "pplx-{a48}", true),
    ("cohere-api-key", "cohere", "{a40}", false),
    ("privateai-api-key", "private_ai", "{l32}", false),
    ("github-pat", "github", "ghp_{a36}", true),
    ("github-oauth-token", "github", "gho_{a36}", true),
    ("github-app-token", "github", "ghu_{a36}", true),
    ("github-app-token", "github", "ghs_{a36}", true),
    ("github-refresh-token", "github", "ghr_{a36}", true),
    (
        "github-fine-grained-pat",
        "github",
        "github_pat_{a22}_{a59}",
        true,
    ),
    ("gitlab-pat", "gitlab", "glpat-{w20}", true),
    ("gitlab-pat", "gitlab", "glpat-{w36}.01.{l9}", true),
    ("gitlab-token", "gitlab", "gldt-{w20}", true),
    ("gitlab-token", "gitlab", "glrt-{w20}", true),
    ("gitlab-token", "gitlab", "glptt-{h40}", true),
    ("gitlab-token", "gitlab", "GR1348941{w20}", true),
    ("gitlab-token", "gitlab", "glcbt-{a3}_{w20}", true),
    ("gitlab-token", "gitlab", "gloas-{w64}", true),
    (
        "gitlab-session-cookie",
        "gitlab",
        "_gitlab_session={l32}",
        true,
    ),
    ("bitbucket-app-password", "bitbucket", "ATBB{a32}", true),
    ("bitbucket-client-secret", "bitbucket", "{w64}", false),
    ("bitbucket-client-id", "bitbucket", "{l32}", false),
    ("npm-token", "npm", "npm_{a36}", true),
    (
        "pypi-upload-token",
        "pypi",
        "pypi-AgEIcHlwaS5vcmc{w70}",
        true,
    ),
    ("rubygems-api-token", "rubygems", "rubygems_{h48}", true),
    ("clojars-api-token", "clojars", "CLOJARS_{l60}", true),
    ("artifactory-api-key", "artifactory", "AKCp{a69}", true),
    ("artifactory-api-key", "artifactory", "cmVmd{a59}", true),
    ("jfrog-token", "jfrog", "{l73}", false),
    ("sourcegraph-token", "sourcegraph", "sgp_{h16}_{h40}", true),
    ("sourcegraph-access-token", "sourcegraph", "{h40}", false),
    ("sonar-token", "sonar_login", "{l40}", false),
    ("sonarqube-token", "sonar", "squ_{h40}", true),
    ("snyk-api-token", "snyk_api", "{U}", false),
    ("codecov-access-token", "codecov", "{l32}", false),
    ("droneci-access-token", "droneci", "{l32}", false),
    ("travisci-access-token", "travis", "{l22}", false),
    ("octopus-deploy-api-key", "octopus", "API-{u26}", true),
    ("harness-api-key", "harness", "pat.{w22}.{a24}.{a20}", true),
    ("infracost-api-token", "infracost", "ico-{a32}", true),
    ("prefect-api-token", "prefect", "pnu_{a36}", true),
    ("readme-api-token", "readme", "rdme_{l70}", true),
    ("settlemint-token", "settlemint", "sm_pat_{a16}", true),
    (
        "sidekiq-secret",
        "BUNDLE_GEMS__CONTRIBSYS__COM",
        "{h8}:{h8}",
        false,
    ),
    (
        "sidekiq-sensitive-url",
        "sidekiq",
        "https://{h8}:{h8}@gems.contribsys.com/",
        true,
    ),
    ("intra42-client-secret", "intra", "s-s4t2ud-{h64}", true),
    ("slack-token", "slack", "xoxb-{d12}-{d13}-{a24}", true),
    ("slack-token", "slack", "xoxb-{d11}-{a24}", true),
    ("slack-token", "slack", "xoxp-{d12}-{d12}-{d12}-{h32}", true),
    ("slack-token", "slack", "xoxr-{a40}", true),
    ("slack-token", "slack", "xoxs-{d10}-{d11}-{d11}-{h64}", true),
    ("slack-config-token", "slack", "xoxe.xoxp-1-{u164}", true),
    ("slack-config-token", "slack", "xoxe-1-{u146}", true),
    (
        "slack-app-token",
        "slack",
        "xapp-1-A{u10}-{d13}-{h64}",
        true,
    ),
    (
        "slack-webhook-url",
        "slack",
        "https://hooks.slack.com/services/T{u8}/B{u10}/{a24}",
        true,
    ),
    (
        "microsoft-teams-webhook",
        "teams",
        "https://contoso.webhook.office.com/webhookb2/{U}@{U}/IncomingWebhook/{h32}/{U}",
        true,
    ),
    ("discord-token", "discord", "{h64}", false),
    ("discord-token", "discord", "{w32}", false),
    ("discord-client-id", "discord", "{d18}", false),
    ("telegram-bot-token", "telegram", "{d10}:AA{w33}", false),
    ("twilio-api-key", "twilio", "SK{h32}", true),
    ("sendgrid-api-token", "sendgrid", "SG.{w22}.{w43}", true),
    ("sendinblue-api-token", "brevo", "xkeysib-{h64}-{a16}", true),
    ("mailgun-api-key", "mailgun", "key-{h32}", false),
    ("mailgun-api-key", "mailgun", "{g32}-{g8}-{g8}", false),
    ("mailgun-pub-key", "mailgun", "pubkey-{h32}", false),
    ("mailchimp-api-key", "mailchimp", "{h32}-us12", false),
    ("mattermost-access-token", "mattermost", "{l26}", false),
    ("messagebird-api-token", "messagebird", "{l25}", false),
    ("messagebird-client-id", "message_bird", "{U}", false),
    ("gitter-access-token", "gitter", "{w40}", false),
    ("intercom-api-key", "intercom", "{w60}", false),
    ("atlassian-api-token", "atlassian", "ATATT3{w186}", true),
    ("atlassian-legacy-token", "jira", "{l24}", false),
    ("linear-api-key", "linear", "lin_api_{a40}", true),
    ("linear-client-secret", "linear", "{h32}", false),
    ("notion-api-token", "notion", "ntn_{d11}{a35}", true),
    ("notion-legacy-token", "notion", "secret_{a43}", false),
    ("asana-client-secret", "asana", "{l32}", false),
    ("asana-client-id", "asana", "{d16}", false),
    ("zendesk-secret-key", "zendesk", "{l40}", false),
    (
        "1password-secret-key",
        "op",
        "A3-{u6}-{u11}-{u5}-{u5}-{u5}",
        true,
    ),
    (
        "1password-service-account-token",
        "op",
        "ops_eyJ{b260}",
        true,
    ),
    ("age-secret-key", "age", "AGE-SECRET-KEY-1{B58}", true),
    ("typeform-token", "typeform", "tfp_{w59}", true),
    ("frameio-api-token", "frameio", "fio-u-{w64}", true),
    (
        "contentful-delivery-api-token",
        "contentful",
        "{w43}",
        false,
    ),
    ("contentful-pat", "contentful", "CFPAT-{w43}", true),
    ("airtable-api-key", "airtable", "key{a14}", false),
    ("airtable-pat", "airtable", "pat{a14}.{h64}", true),
    ("beamer-api-token", "beamer", "b_{w44}", false),
    ("squarespace-access-token", "squarespace", "{U}", false),
    ("hubspot-api-key", "hubspot", "{V}", false),
    ("launchdarkly-access-token", "launchdarkly", "{w40}", false),
    ("netlify-access-token", "netlify", "{w43}", false),
    (
        "defined-networking-api-token",
        "dnkey",
        "dnkey-{l26}-{l52}",
        false,
    ),
    (
        "authress-access-key",
        "authress",
        "sc_{l10}.{l5}.acc_{l26}.{w60}",
        true,
    ),
    ("lob-api-key", "lob", "live_{h35}", false),
    ("lob-pub-api-key", "lob", "test_pub_{h31}", false),
    ("looker-client-secret", "looker", "{l24}", false),
    ("looker-client-id", "looker", "{l20}", false),
    ("maxmind-license-key", "maxmind", "{a6}_{a29}_mmk", true),
    ("adafruit-api-key", "adafruit", "{w32}", false),
    ("adafruit-io-key", "adafruit", "aio_{a28}", true),
    ("adobe-client-id", "adobe", "{h32}", false),
    ("adobe-client-secret", "adobe", "p8e-{a32}", true),
    ("algolia-api-key", "algolia", "{l32}", false),
    ("stripe-secret-key", "stripe", "sk_live_{a24}", true),
    ("stripe-secret-key", "stripe", "rk_test_{a99}", true),
    ("square-access-token", "square", "sq0atp-{w22}", true),
    ("square-access-token", "square", "EAAA{w60}", true),
    ("square-access-token", "square", "sq0csp-{w43}", true),
    ("shopify-token", "shopify", "shpat_{h32}", true),
    ("shopify-token", "shopify", "shpss_{h32}", true),
    ("shippo-api-token", "shippo", "shippo_live_{h40}", true),
    ("duffel-api-token", "duffel", "duffel_test_{w43}", true),
    ("easypost-api-token", "easypost", "EZAK{a54}", true),
    ("easypost-api-token", "easypost", "EZTK{a54}", true),
    ("postman-api-token", "postman", "PMAK-{h24}-{h34}", true),
    (
        "flutterwave-key",
        "flutterwave",
        "FLWSECK_TEST-{h32}-X",
        true,
    ),
    ("flutterwave-key", "flutterwave", "FLWSECK_TEST-{h12}", true),
    (
        "flutterwave-public-key",
        "flutterwave",
        "FLWPUBK_TEST-{h32}-X",
        true,
    ),
    ("plaid-api-token", "plaid", "access-sandbox-{U}", false),
    ("plaid-secret-key", "plaid", "{l30}", false),
    ("plaid-client-id", "plaid", "{l24}", false),
    ("coinbase-access-token", "coinbase", "{w64}", false),
    ("kraken-access-token", "kraken", "{b86}", false),
    ("kucoin-key", "kucoin", "{h24}", false),
    ("kucoin-key", "kucoin", "{U}", false),
    ("bittrex-key", "bittrex", "{l32}", false),
    ("finicity-key", "finicity", "{h32}", false),
    ("finicity-key", "finicity", "{l20}", false),
    ("finnhub-access-token", "finnhub", "{l20}", false),
    ("freshbooks-access-token", "freshbooks", "{l64}", false),
    ("gocardless-api-token", "gocardless", "live_{w40}", false),
    ("etsy-access-token", "etsy", "{l24}", false),
    ("rapidapi-access-token", "rapidapi", "{w50}", false),
    ("nytimes-access-token", "nytimes", "{w32}", false),
    ("datadog-access-token", "datadog", "{l40}", false),
    ("datadog-access-token", "datadog", "{h32}", false),
    ("sentry-user-token", "sentry", "sntryu_{h64}", true),
    (
        "sentry-org-token",
        "sentry",
        "sntrys_eyJpYXQiOjE3MDAwMDAwMDAsInVybCI6Imh0dHBzOi8vc2VudHJ5LmlvIiwicmVnaW9uX3VybCI6Imh0dHBzOi8vdXMuc2VudHJ5LmlvIiwib3JnIjoiZXhhbXBsZSJ9_{b43}",
        true,
    ),
    ("sentry-access-token", "sentry", "{h64}", false),
    ("grafana-token", "grafana", "eyJrIjoi{a80}", true),
    ("grafana-token", "grafana", "glc_{b64}", true),
    ("grafana-token", "grafana", "glsa_{a32}_{h8}", true),
    ("new-relic-key", "newrelic", "NRAK-{u27}", true),
    ("new-relic-key", "newrelic", "NRII-{w32}", true),
    ("new-relic-browser-key", "newrelic", "NRJS-{h19}", true),
    ("new-relic-user-api-id", "new_relic", "{l64}", false),
    ("sumologic-access-token", "SUMO", "{a64}", false),
    ("sumologic-access-id", "sumo", "su{a12}", false),
    ("cisco-meraki-api-key", "meraki", "{h40}", false),
    ("okta-access-token", "okta", "00{w40}", false),
    ("confluent-secret-key", "confluent", "{l64}", false),
    ("confluent-access-token", "confluent", "{u16}", false),
    ("fastly-api-token", "fastly", "{w32}", false),
    ("sendbird-access-token", "sendbird", "{h40}", false),
    ("sendbird-access-id", "sendbird", "{V}", false),
    (
        "twitter-bearer-token",
        "twitter",
        "AAAAAAAAAAAAAAAAAAAAAA{a90}",
        false,
    ),
    ("twitter-access-token", "twitter", "{d19}-{a30}", false),
    ("twitter-secret", "twitter", "{a50}", false),
    ("twitter-secret", "twitter", "{a45}", false),
    ("twitter-secret", "twitter", "{a25}", false),
    ("facebook-secret", "facebook", "{h32}", false),
    ("facebook-access-token", "facebook", "{d15}|{w27}", false),
    ("facebook-page-access-token", "fb", "EAAC{a120}", true),
    ("flickr-access-token", "flickr", "{l32}", false),
    ("twitch-api-token", "twitch", "{l30}", false),
    ("linkedin-client-secret", "linkedin", "{l16}", false),
    ("linkedin-client-id", "linked_in", "{l14}", false),
    ("mapbox-api-token", "mapbox", "pk.{l60}.{l22}", false),
    (
        "mapbox-secret-token",
        "mapbox",
        "sk.eyJ1IjoiZXhhbXBsZSIsImEiOiJ{a10}.{w22}",
        true,
    ),
    ("dropbox-api-token", "dropbox", "sl.{w135}", false),
    (
        "dropbox-api-token",
        "dropbox",
        "{l11}AAAAAAAAAA{w43}",
        false,
    ),
    ("dropbox-api-token", "dropbox", "{l15}", false),
    (
        "jwt",
        "session",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ{a24}.{w43}",
        true,
    ),
    (
        "url-credentials",
        "database",
        "postgres://app:{a20}@db.internal.test:5432/app",
        true,
    ),
    ("generic-api-key", "service", "{a32}", false),
    ("generic-api-key", "client_secret", "{w40}", false),
];

/// Hand-written look-alikes and ordinary text. Some are built from pieces so the file itself
/// does not hold a run a secret scanner would match.
fn negatives() -> Vec<String> {
    let x = |n: usize| "x".repeat(n);
    let zeros = |n: usize| "0".repeat(n);
    let mut lines: Vec<String> = [
        // Documentation and placeholder values.
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "api_key = \"your_api_key_here\"",
        "password = \"changeme\"",
        "token: ${GITHUB_TOKEN}",
        "secret: {{ secrets.DEPLOY_KEY }}",
        "client_secret = \"<client-secret>\"",
        "SLACK_TOKEN=xoxb-12345-abcd234",
        "\"slack_user_token\": \"xoxp-9876543210\"",
        "\"legacy\": \"xoxp-4321-8765-2109-9a1c3e5b7d2f4a6c8e0b1d3f5a7c9e2b\"",
        "\"redacted\": \"xoxp-111122223333-444455556666-777788889999-********************\"",
        "vault client: s.RetryPolicyForAllClients ",
        "vault_opts = s.buildTokenReviewerClient = fn",
        "curl -u 'demo:demo' https://localhost:8443/health",
        "curl -fsS --user \"$USER:$PASS\" \"$URL\" -o out.json",
        "curl -u <username:password> https://api.example.test/items",
        "curl --user admin:[SECRET] http://[HOST]:8080/status",
        "curl -u myuser:password https://api.example.test",
        "curl -u \"${user}:${pass}\" https://api.example.test",
        "curl --user \"aaa:bbb\" https://api.example.test",
        "eaaab1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9",
        "telegram_bot_token = \"98765432:AuthorizationHeaderValueTypeNameXyz\"",
        "<xs:attribute name=\"telegramCode\" type=\"cat98765:AuthorizationHeaderValueTypeNameXyz\"/>",
        "stripe.publishable_key = \"pk_live_51Hx2B3C4D5E6F7G8H9I0J\"",
        "TWILIO_ACCOUNT_SID=AC0123456789abcdef0123456789abcdef",
        "discord_invite: https://discord.gg/abcd1234",
        "heroku_app = \"my-heroku-app-name\"",
        "background: url(/static/img/banner.ico-0c9e8d7f6a5b4c3d2e1f0a9b8c7d6e5f.png)",
        // Identifiers next to a provider's name: not secrets.
        "heroku_app_id = \"0f6b3c2a-9d41-4e7b-8a15-2c9e7d3f1b64\"",
        "SNYK_ORG_ID=5e1c7a90-3b2d-4f68-a7c1-9d0e8b4f2a36",
        "\"squarespaceSiteId\": \"c3a9e2f1-7b64-4d08-9e15-a2b7c4d6e8f0\"",
        "datadog_monitor_id: 0123456789abcdef0123456789abcdef",
        // Ordinary code and prose with secret-sounding words.
        "fn token(&self) -> &str { &self.token }",
        "let secret_len = 32;",
        "The key to a fast build is caching: keep the token count low.",
        "const API_VERSION = \"2024-06-01\";",
        "request_id = \"3f9c1a2e-5b7d-4c8e-9f01-23456789abcd\"",
        "commit = \"9fceb02d0ae598e95dc970b74767f19372d61af8\"",
        "image: registry.test/app@sha256:3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a",
        "\"integrity\": \"sha512-Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy==\"",
        "password_min_length: 12",
        "secret_name: database-credentials",
        "key_id: 7",
        "primary_key = \"user_id\"",
        "public_key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleOnlyNotARealKeyAtAll user@host",
        "See https://docs.example.test/api/keys for how to create an access token.",
        "author: Jane Doe <jane@example.test>",
        "The Twitter API v2 is documented at developer.twitter.com.",
        "Discord and Slack integrations are configured in settings.",
        "mailgun_domain = \"mg.example.test\"",
        "sentry_dsn_enabled = true",
        "datadog_site = \"datadoghq.eu\"",
        "okta_org_url = \"https://dev-000000.okta.test\"",
        "GOOGLE_MAPS_API_KEY=AIzaSyabcdefghijklmnopqrstuvwxyz1234567",
        "pk.eyJ1IjoiZXhhbXBsZSJ9 is a public Mapbox token prefix",
        "uuid: 00000000-0000-0000-0000-000000000000",
        "slack_channel = \"#deploys\"",
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUExample\n-----END CERTIFICATE-----",
        "use aho_corasick::AhoCorasick; // keyword prefilter",
        "use crate::tls12::{self, ConnectionSecrets, Tls12CipherSuite};",
        "    let raw_private_key: Curve25519SeedBin<'_> = private_key",
        "            ClientHandshakeTrafficSecret => \"CLIENT_HANDSHAKE_TRAFFIC_SECRET\",",
        "        common.enable_secret_extraction = config.enable_secret_extraction;",
        "assert_eq!(tokens.len(), 3, \"three tokens expected\");",
        "if password.is_empty() { return Err(Error::MissingPassword); }",
        "export PATH=\"$HOME/.cargo/bin:$PATH\"",
        "sonar.projectKey=my-project",
        "linear-gradient(90deg, #000 0%, #fff 100%)",
        "The airtable base id is appXXXXXXXXXXXXXX.",
        "jira_url = \"https://example.atlassian.net\"",
    ]
    .iter()
    .map(|line| (*line).to_owned())
    .collect();
    // Built from pieces: shapes a scanner would match, but values that are not secrets.
    lines.extend([
        format!(
            "\"masked\": \"xoxp-{}-{}-{}-{}\"",
            "X".repeat(10),
            "X".repeat(10),
            "X".repeat(11),
            "X".repeat(32)
        ),
        format!("ghp_{}", x(36)),
        format!("github_token = \"ghp_{}\"", zeros(36)),
        format!("apiKey: \"AIza{}\"", "a".repeat(35)),
        format!("AIZASY{}", "Q7M2X9L4R8T3W6P1N5V0B2C7D4F9H3J6K"),
        format!(
            "Zq8Lm3Np7Rt2Vx6Bc9Df4Gh1Jk5{}",
            "AIzaQw2Er4Ty6Ui8Op0As3Df5Gh7Jk9Lz1Xc3Vb"
        ),
        format!("AIza{}wxyz789", "Qw2Er4Ty6Ui8Op0As3Df5Gh7Jk9Lz1Xc3Vb"),
        // Public sample keys from Firebase's SDK (the allowlist names them).
        format!("AIza{}", "SyAnLA7NfeLquW1tJFpx_eQCxoX-oo6YyIs"),
        format!(
            "firebase_api_key: AIza{}",
            "SyCkEhVjf3pduRDt6d1yKOMitrUEke8agEM"
        ),
        format!("vault_token = s.{}", x(24)),
        format!("vault_token = s.{}", "ALLCAPSPLACEHOLDERVALUEX"),
        format!("vault_token = hvs.{}", x(96)),
        format!("anthropic_key = \"sk-ant-api03-{}AA\"", x(93)),
        format!("OPENAI_API_KEY=sk-proj-{}", x(60)),
        format!("stripe_key = sk_test_{}", zeros(24)),
        format!("npm_token = npm_{}", x(36)),
        format!(
            "telegram_api_token = \"12345678:Abonus{}\"",
            "abc-DEF_ghi".repeat(4)
        ),
        format!("dop_v1_{}", zeros(64)),
        format!("AGE-SECRET-KEY-1{}", "Q".repeat(58)),
        format!("glpat-{}", x(20)),
        format!("shpat_{}", zeros(32)),
    ]);
    lines
}

/// Every case: each family in a rotation of contexts, then the false positives.
pub fn cases() -> Vec<Case> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut cases = Vec::new();
    let mut rotation = 0usize;
    for &(expected, ident, template, bare) in FAMILIES {
        for _ in 0..4 {
            let context = CONTEXTS[rotation % CONTEXTS.len()];
            rotation += 1;
            let secret = expand(&mut rng, template);
            let text = context
                .replace("{i}", ident)
                .replace("{I}", &ident.to_ascii_uppercase())
                .replace("{s}", &secret);
            cases.push(Case {
                text,
                expected: Some(expected),
            });
        }
        if bare {
            for context in BARE_CONTEXTS {
                let secret = expand(&mut rng, template);
                cases.push(Case {
                    text: context.replace("{s}", &secret),
                    expected: Some(expected),
                });
            }
        }
    }
    for text in negatives() {
        cases.push(Case {
            text,
            expected: None,
        });
    }
    cases
}
