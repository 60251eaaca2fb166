//! Bottle identities: `<slugified label>-<5 random [a-z0-9]>`.

use rand::Rng;

/// Lowercase ASCII letters and digits, runs of anything else folded to one `-`,
/// trimmed, at most 40 characters. An empty result becomes `bottle`.
#[must_use]
pub fn slugify(label: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
        } else {
            dash = true;
        }
        if out.len() >= 40 {
            break;
        }
    }
    if out.is_empty() {
        "bottle".to_owned()
    } else {
        out
    }
}

/// A new identity for a bottle with this label.
#[must_use]
pub fn new_identity(label: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("{}-{suffix}", slugify(label))
}

/// Picks a label whose slug no running bottle uses: `label`, else `label-2`, `label-3`, ….
/// Returns the label and whether it changed, so the caller can say so.
#[must_use]
pub fn uniquify_label(label: &str, active_label_slugs: &[String]) -> (String, bool) {
    let taken = |candidate: &str| active_label_slugs.iter().any(|s| *s == slugify(candidate));
    if !taken(label) {
        return (label.to_owned(), false);
    }
    let mut n = 2;
    while taken(&format!("{label}-{n}")) {
        n += 1;
    }
    (format!("{label}-{n}"), true)
}

/// True when `slug` has the shape of an identity (used to reject path tricks).
#[must_use]
pub fn is_valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= 64
        && slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !slug.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugify_folds_and_trims() {
        assert_eq!(slugify("  Fix the Bug! #42 "), "fix-the-bug-42");
        assert_eq!(slugify("***"), "bottle");
        assert_eq!(slugify("ünïcode"), "n-code");
    }

    #[test]
    fn identity_has_random_suffix() {
        let id = new_identity("Researcher");
        assert!(id.starts_with("researcher-"), "{id}");
        assert_eq!(id.len(), "researcher-".len() + 5);
        assert!(is_valid_slug(&id));
    }

    #[test]
    fn label_collision_gets_next_free_number() {
        let active = vec!["researcher".to_owned(), "researcher-2".to_owned()];
        assert_eq!(
            uniquify_label("researcher", &active),
            ("researcher-3".to_owned(), true)
        );
        assert_eq!(
            uniquify_label("writer", &active),
            ("writer".to_owned(), false)
        );
    }

    #[test]
    fn slugs_reject_path_tricks() {
        assert!(!is_valid_slug("../etc"));
        assert!(!is_valid_slug("a/b"));
        assert!(!is_valid_slug(""));
    }
}
