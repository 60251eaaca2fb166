//! The fake Gitea and the client, checked against Gitea's published spec.

use std::collections::BTreeSet;

use bot_bottle_forge::gitea::Route;
use bot_bottle_testkit::gitea::{BASE_PATH, ROUTES};
use serde_json::Value;

fn spec() -> Value {
    let path = crate::shared_testdata("gitea-swagger.v1.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the Gitea spec must be at {}: {e}", path.display()));
    serde_json::from_str(&text).expect("spec is JSON")
}

fn operation<'a>(spec: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    spec["paths"].get(path)?.get(method.to_ascii_lowercase())
}

/// Statuses the operation documents: its `responses`, plus any status its
/// description names (`issueEditIssue` documents the `content_version` 409 only
/// in its description).
fn documented_statuses(op: &Value) -> BTreeSet<u16> {
    let mut statuses: BTreeSet<u16> = op["responses"]
        .as_object()
        .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    let description = op["description"].as_str().unwrap_or_default();
    for word in description.split(|c: char| !c.is_ascii_digit()) {
        if word.len() == 3
            && let Ok(status) = word.parse::<u16>()
            && (100..600).contains(&status)
        {
            statuses.insert(status);
        }
    }
    statuses
}

#[test]
fn spec_base_path_is_the_fakes() {
    // The spec's basePath is an absolute URL; its path part is what gets stripped.
    let base = spec()["basePath"].as_str().expect("basePath").to_owned();
    assert!(base.ends_with(BASE_PATH), "{base}");
}

#[test]
fn every_fake_route_and_status_is_in_the_spec() {
    let spec = spec();
    let mut problems = Vec::new();
    for route in ROUTES {
        let Some(op) = operation(&spec, route.method, route.path) else {
            problems.push(format!(
                "{} {} is not in the spec",
                route.method, route.path
            ));
            continue;
        };
        let documented = documented_statuses(op);
        for status in route.statuses {
            if !documented.contains(status) {
                problems.push(format!(
                    "{} {} answers {status}, the spec lists {documented:?}",
                    route.method, route.path
                ));
            }
        }
    }
    assert_eq!(Vec::<String>::new(), problems);
}

#[test]
fn every_client_route_is_in_the_spec_and_served_by_the_fake() {
    let spec = spec();
    let mut problems = Vec::new();
    for route in Route::ALL {
        if operation(&spec, route.method(), route.template()).is_none() {
            problems.push(format!(
                "client calls {} {}, not in the spec",
                route.method(),
                route.template()
            ));
        }
        if !ROUTES
            .iter()
            .any(|r| r.method == route.method() && r.path == route.template())
        {
            problems.push(format!(
                "client calls {} {}, the fake does not serve it",
                route.method(),
                route.template()
            ));
        }
    }
    assert_eq!(Vec::<String>::new(), problems);
}

#[test]
fn the_spec_says_patch_answers_201_and_membership_answers_303() {
    // The quirks the client handles, pinned to the spec they come from.
    let spec = spec();
    let edit = operation(&spec, "PATCH", "/repos/{owner}/{repo}/issues/{index}").expect("edit");
    assert!(edit["responses"].get("201").is_some());
    assert!(edit["responses"].get("200").is_none());
    assert!(documented_statuses(edit).contains(&409));
    let member = operation(&spec, "GET", "/orgs/{org}/members/{username}").expect("member");
    assert_eq!(BTreeSet::from([204, 303, 404]), documented_statuses(member));
}

/// Field names in the webhook fixtures are the spec's.
#[test]
fn fixture_fields_are_spec_fields() {
    let spec = spec();
    let props = |definition: &str| -> BTreeSet<String> {
        spec["definitions"][definition]["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    };
    let check = |value: &Value, definition: &str, problems: &mut Vec<String>| {
        let allowed = props(definition);
        assert!(!allowed.is_empty(), "definition {definition} exists");
        for key in value.as_object().expect("object").keys() {
            if !allowed.contains(key) {
                problems.push(format!("{definition} has no field `{key}`"));
            }
        }
    };
    let mut problems = Vec::new();
    for name in [
        "issues_label_updated.json",
        "issue_comment_created.json",
        "issue_comment_own.json",
        "pull_request_closed.json",
    ] {
        let payload: Value = serde_json::from_slice(&crate::fixture(name)).expect("json");
        check(&payload["repository"], "Repository", &mut problems);
        check(&payload["sender"], "User", &mut problems);
        if let Some(issue) = payload.get("issue") {
            check(issue, "Issue", &mut problems);
            check(&issue["user"], "User", &mut problems);
            for label in issue["labels"].as_array().expect("labels") {
                check(label, "Label", &mut problems);
            }
        }
        if let Some(comment) = payload.get("comment") {
            check(comment, "Comment", &mut problems);
        }
        if let Some(pr) = payload.get("pull_request") {
            check(pr, "PullRequest", &mut problems);
            check(&pr["head"], "PRBranchInfo", &mut problems);
        }
    }
    assert_eq!(Vec::<String>::new(), problems);
}
