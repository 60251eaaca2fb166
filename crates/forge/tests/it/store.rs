//! `SqliteForgeStateStore` on a real temporary database.

use std::sync::Arc;
use std::thread;

use bot_bottle_forge::{ForgeState, ForgeStateStore, ForgeStatus, SqliteForgeStateStore};

fn state() -> ForgeState {
    ForgeState {
        owner: "didericis".to_owned(),
        repo: "bot-bottle".to_owned(),
        issue_number: 17,
        slug: "implementer-abc12".to_owned(),
        agent_name: "implementer".to_owned(),
        bottle_names: vec!["claude".to_owned()],
        backend_name: "docker".to_owned(),
        agent_git_user: "didericis-claude".to_owned(),
        pr_number: Some(42),
        status: ForgeStatus::Frozen,
        last_checkin_at: "2026-06-29T12:04:12-04:00".to_owned(),
        base_commit_sha: "4b825dc642cb6eb9a060e54bf8d69288fbee4904".to_owned(),
        resume_rounds: 0,
        watchdog_fired: false,
        pending_prompt: None,
        note: None,
    }
}

struct Db {
    _dir: tempfile::TempDir,
    store: SqliteForgeStateStore,
}

fn db() -> Db {
    let dir = tempfile::tempdir().expect("tempdir");
    // A parent that does not exist yet: opening must create it.
    let store =
        SqliteForgeStateStore::open(dir.path().join("sub").join("bot-bottle.db")).expect("open");
    Db { _dir: dir, store }
}

#[test]
fn round_trip() {
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    assert_eq!(
        Some(state()),
        db.store.get("didericis", "bot-bottle", 17).expect("get")
    );
}

#[test]
fn missing_returns_none() {
    let db = db();
    assert_eq!(None, db.store.get("nobody", "nope", 1).expect("get"));
}

#[test]
fn creates_parent_directories() {
    let db = db();
    assert!(db.store.path().parent().expect("parent").is_dir());
    assert_eq!(None, db.store.get("x", "y", 1).expect("get"));
}

#[test]
fn upsert_replaces() {
    let db = db();
    db.store
        .upsert(&ForgeState {
            status: ForgeStatus::Running,
            ..state()
        })
        .expect("first");
    db.store.upsert(&state()).expect("second");
    let all = db.store.all().expect("all");
    assert_eq!(vec![state()], all);
}

#[test]
fn delete_is_idempotent() {
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    db.store
        .delete("didericis", "bot-bottle", 17)
        .expect("delete");
    db.store
        .delete("didericis", "bot-bottle", 17)
        .expect("again");
    assert_eq!(
        None,
        db.store.get("didericis", "bot-bottle", 17).expect("get")
    );
}

#[test]
fn all_lists_across_repos_sorted() {
    let db = db();
    db.store
        .upsert(&ForgeState {
            issue_number: 18,
            slug: "other".to_owned(),
            ..state()
        })
        .expect("18");
    db.store.upsert(&state()).expect("17");
    db.store
        .upsert(&ForgeState {
            owner: "acme".to_owned(),
            repo: "widget".to_owned(),
            issue_number: 3,
            ..state()
        })
        .expect("3");
    let keys: Vec<(String, u64)> = db
        .store
        .all()
        .expect("all")
        .into_iter()
        .map(|s| (s.owner, s.issue_number))
        .collect();
    assert_eq!(
        vec![
            ("acme".to_owned(), 3),
            ("didericis".to_owned(), 17),
            ("didericis".to_owned(), 18)
        ],
        keys
    );
}

#[test]
fn all_empty() {
    assert_eq!(Vec::<ForgeState>::new(), db().store.all().expect("all"));
}

#[test]
fn bottle_names_list_preserved() {
    let db = db();
    let with_two = ForgeState {
        bottle_names: vec!["claude".to_owned(), "dev".to_owned()],
        ..state()
    };
    db.store.upsert(&with_two).expect("upsert");
    assert_eq!(
        vec!["claude".to_owned(), "dev".to_owned()],
        db.store
            .get("didericis", "bot-bottle", 17)
            .expect("get")
            .expect("present")
            .bottle_names
    );
}

#[test]
fn pr_number_nullable() {
    let db = db();
    db.store
        .upsert(&ForgeState {
            pr_number: None,
            ..state()
        })
        .expect("upsert");
    assert_eq!(
        None,
        db.store
            .get("didericis", "bot-bottle", 17)
            .expect("get")
            .expect("present")
            .pr_number
    );
}

#[test]
fn persists_across_store_instances() {
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    let reopened = SqliteForgeStateStore::open(db.store.path()).expect("reopen");
    assert_eq!(
        Some(state()),
        reopened.get("didericis", "bot-bottle", 17).expect("get")
    );
}

#[test]
fn database_runs_in_wal_mode() {
    let db = db();
    let other = rusqlite::Connection::open(db.store.path()).expect("open");
    let mode: String = other
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("journal mode");
    assert_eq!("wal", mode);
}

#[test]
fn find_by_pr_maps_a_pr_back_to_its_issue() {
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    assert_eq!(
        Some(17),
        db.store
            .find_by_pr("didericis", "bot-bottle", 42)
            .expect("find")
            .map(|s| s.issue_number)
    );
    assert_eq!(
        None,
        db.store
            .find_by_pr("didericis", "bot-bottle", 43)
            .expect("find")
    );
}

#[test]
fn update_changes_fields_but_never_the_key() {
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    let updated = db
        .store
        .update("didericis", "bot-bottle", 17, &mut |s| {
            s.status = ForgeStatus::Running;
            s.resume_rounds += 1;
            s.issue_number = 999;
        })
        .expect("update")
        .expect("present");
    assert_eq!(
        ForgeState {
            status: ForgeStatus::Running,
            resume_rounds: 1,
            watchdog_fired: false,
            pending_prompt: None,
            note: None,
            ..state()
        },
        updated
    );
    assert_eq!(
        None,
        db.store.get("didericis", "bot-bottle", 999).expect("get")
    );
    assert_eq!(
        None,
        db.store
            .update("nobody", "nope", 1, &mut |_| {})
            .expect("absent")
    );
}

/// Two writers, each with its own connection (as two processes would have), race
/// read-modify-write updates on one record: none may be lost.
#[test]
fn two_writers_lose_no_update() {
    const ROUNDS: u32 = 100;
    let db = db();
    db.store.upsert(&state()).expect("upsert");
    let path = db.store.path().to_path_buf();
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let store = Arc::new(SqliteForgeStateStore::open(&path).expect("open"));
            thread::spawn(move || {
                for _ in 0..ROUNDS {
                    store
                        .update("didericis", "bot-bottle", 17, &mut |s| s.resume_rounds += 1)
                        .expect("update");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    assert_eq!(
        2 * ROUNDS,
        db.store
            .get("didericis", "bot-bottle", 17)
            .expect("get")
            .expect("present")
            .resume_rounds
    );
}

/// Two writers inserting different records concurrently both land.
#[test]
fn two_writers_inserting_both_land() {
    let db = db();
    let path = db.store.path().to_path_buf();
    let writers: Vec<_> = (0..2u64)
        .map(|writer| {
            let path = path.clone();
            thread::spawn(move || {
                let store = SqliteForgeStateStore::open(&path).expect("open");
                for n in 0..50u64 {
                    store
                        .upsert(&ForgeState {
                            issue_number: writer * 1000 + n,
                            ..state()
                        })
                        .expect("upsert");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    assert_eq!(100, db.store.all().expect("all").len());
}

#[test]
fn deliveries_are_recorded_once() {
    let db = db();
    let keys = vec!["delivery:a".to_owned(), "comment:9001".to_owned()];
    assert!(db.store.record_delivery(&keys).expect("first"));
    assert!(!db.store.record_delivery(&keys).expect("replay"));
    // Redelivery: new UUID, same semantic key.
    let redelivery = vec!["delivery:b".to_owned(), "comment:9001".to_owned()];
    assert!(!db.store.record_delivery(&redelivery).expect("redelivery"));
    // A refused duplicate records nothing, so its UUID is still unseen.
    assert!(
        db.store
            .record_delivery(&["delivery:b".to_owned()])
            .expect("fresh")
    );
}

#[test]
fn concurrent_redeliveries_are_handled_once() {
    let db = db();
    let path = db.store.path().to_path_buf();
    let handled: Vec<bool> = (0..4)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let store = SqliteForgeStateStore::open(&path).expect("open");
                store
                    .record_delivery(&[format!("delivery:{i}"), "comment:1".to_owned()])
                    .expect("record")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(1, handled.iter().filter(|h| **h).count());
}

#[test]
fn a_newer_schema_is_refused_with_a_hint() {
    let db = db();
    let path = db.store.path().to_path_buf();
    rusqlite::Connection::open(&path)
        .expect("open")
        .pragma_update(None, "user_version", 99)
        .expect("bump");
    let error = SqliteForgeStateStore::open(&path).expect_err("too new");
    assert!(
        matches!(
            error,
            bot_bottle_forge::StoreError::TooNew { found: 99, .. }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("hint: upgrade bot-bottle"));
}
