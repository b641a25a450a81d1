//! Label selectors: which nodes a run (or a deployment's warm runners) may
//! go to. The one definition every part uses: the scheduler
//! ([`crate::schedule`]), the pre-warm planner ([`crate::prewarm`]) and the
//! stores' warm hand-off.

use std::collections::BTreeMap;

/// Whether a node with `labels` satisfies `selector`: it has every label
/// the selector names, with the same value (an empty selector matches
/// every node; labels the selector does not name do not matter).
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_selected_label_must_be_there_with_its_value() {
        let labels = map(&[("zone", "a"), ("gpu", "yes")]);
        assert!(matches(&map(&[]), &labels), "empty selects all");
        assert!(matches(&map(&[]), &map(&[])));
        assert!(matches(&map(&[("zone", "a")]), &labels));
        assert!(matches(&map(&[("zone", "a"), ("gpu", "yes")]), &labels));
        assert!(!matches(&map(&[("zone", "b")]), &labels), "other value");
        assert!(!matches(&map(&[("ssd", "yes")]), &labels), "missing label");
        assert!(
            !matches(&map(&[("zone", "a"), ("ssd", "yes")]), &labels),
            "one of two missing"
        );
        assert!(
            !matches(&map(&[("zone", "")]), &map(&[])),
            "empty value is a value"
        );
    }
}
