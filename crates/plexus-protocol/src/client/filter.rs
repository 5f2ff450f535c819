//! Tags filters ([`FilterNode`]): a subscriber of a namespace that allows them
//! (`allow_tags_filter`) gets only the publications whose tags match its filter. The rules
//! are Centrifugo's, so a filter built with centrifuge-js means the same here:
//!
//! - a comparison (`op` empty) looks at the tag `key`: `eq`, `neq` (also true without the tag),
//!   `in`/`nin` (`vals`; a missing tag counts as `""`), `ex`/`nex` (present or not), `sw`, `ew`,
//!   `ct` (starts with, ends with, contains), and `gt`, `gte`, `lt`, `lte`, which compare
//!   decimal numbers exactly (false when either side is not one);
//! - `and` and `or` of one or more `nodes`, `not` of exactly one.
//!
//! A filter is checked once, when subscribing ([`FilterNode::validate`]), and then matched
//! against every publication without allocating.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::types::FilterNode;

/// Most nodes in one filter, and how deep they may nest: a filter is matched against every
/// publication of the channel, so its size is bounded.
const MAX_NODES: usize = 256;
const MAX_DEPTH: usize = 16;

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad tags filter: {0}")]
pub struct FilterError(String);

impl FilterNode {
    /// Whether the filter is well formed (and small enough).
    pub fn validate(&self) -> Result<(), FilterError> {
        let mut nodes = 0;
        self.check(1, &mut nodes)
    }

    fn check(&self, depth: usize, nodes: &mut usize) -> Result<(), FilterError> {
        *nodes += 1;
        if depth > MAX_DEPTH || *nodes > MAX_NODES {
            return Err(FilterError(format!(
                "at most {MAX_NODES} nodes, nested at most {MAX_DEPTH} deep"
            )));
        }
        let refuse = |why: String| Err(FilterError(why));
        match self.op.as_str() {
            "" => {
                let (val, vals) = (!self.val.is_empty(), !self.vals.is_empty());
                match self.cmp.as_str() {
                    "eq" | "neq" | "sw" | "ew" | "ct" | "gt" | "gte" | "lt" | "lte" => {
                        if !val || vals {
                            return refuse(format!("{} takes val, not vals", self.cmp));
                        }
                    }
                    "in" | "nin" => {
                        if val || !vals {
                            return refuse(format!("{} takes vals, not val", self.cmp));
                        }
                    }
                    "ex" | "nex" => {
                        if val || vals {
                            return refuse(format!("{} takes neither val nor vals", self.cmp));
                        }
                    }
                    "" => return refuse("a comparison needs cmp".into()),
                    other => return refuse(format!("unknown comparison {other:?}")),
                }
                if self.key.is_empty() && !matches!(self.cmp.as_str(), "ex" | "nex") {
                    return refuse("a comparison needs key".into());
                }
                if !self.nodes.is_empty() {
                    return refuse("a comparison has no nodes".into());
                }
            }
            "and" | "or" if self.nodes.is_empty() => {
                return refuse(format!("{} needs at least one node", self.op));
            }
            "not" if self.nodes.len() != 1 => return refuse("not takes exactly one node".into()),
            "and" | "or" | "not" => {}
            other => return refuse(format!("unknown op {other:?}")),
        }
        self.nodes
            .iter()
            .try_for_each(|node| node.check(depth + 1, nodes))
    }

    /// Whether a publication with these tags passes (the filter must be valid).
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        match self.op.as_str() {
            "and" => self.nodes.iter().all(|node| node.matches(tags)),
            "or" => self.nodes.iter().any(|node| node.matches(tags)),
            "not" => !self.nodes.iter().all(|node| node.matches(tags)),
            _ => {
                let tag = tags.get(&self.key).map(String::as_str);
                let value = tag.unwrap_or("");
                let compare = || tag.and_then(|tag| compare_decimals(tag, &self.val));
                match self.cmp.as_str() {
                    "eq" => tag == Some(self.val.as_str()),
                    "neq" => tag != Some(self.val.as_str()),
                    "in" => self.vals.iter().any(|val| val == value),
                    "nin" => !self.vals.iter().any(|val| val == value),
                    "ex" => tag.is_some(),
                    "nex" => tag.is_none(),
                    "sw" => tag.is_some_and(|tag| tag.starts_with(&self.val)),
                    "ew" => tag.is_some_and(|tag| tag.ends_with(&self.val)),
                    "ct" => tag.is_some_and(|tag| tag.contains(&self.val)),
                    "gt" => compare() == Some(Ordering::Greater),
                    "gte" => compare().is_some_and(Ordering::is_ge),
                    "lt" => compare() == Some(Ordering::Less),
                    "lte" => compare().is_some_and(Ordering::is_le),
                    _ => false,
                }
            }
        }
    }
}

/// Longest number a comparison reads, and most digits after its point (as the decimal type
/// Centrifugo compares with).
const MAX_NUMBER_LEN: usize = 200;
const MAX_FRACTION_DIGITS: usize = 19;

/// A decimal number's parts: negative, integer digits without leading zeros, fraction digits
/// without trailing zeros. The form is `[+-]digits[.digits]`: no exponent, no spaces, digits
/// on both sides of a point.
fn decimal(text: &str) -> Option<(bool, &str, &str)> {
    if text.len() > MAX_NUMBER_LEN {
        return None;
    }
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (integer, fraction) = match digits.split_once('.') {
        Some((_, "")) => return None, // "1." is not one
        Some(parts) => parts,
        None => (digits, ""),
    };
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if integer.is_empty()
        || !all_digits(integer)
        || !all_digits(fraction)
        || fraction.len() > MAX_FRACTION_DIGITS
    {
        return None;
    }
    let integer = integer.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    // Zero has no sign.
    let negative = negative && !(integer.is_empty() && fraction.is_empty());
    Some((negative, integer, fraction))
}

/// `a` against `b` as exact decimal numbers; `None` if either is not one.
fn compare_decimals(a: &str, b: &str) -> Option<Ordering> {
    let (a_negative, a_integer, a_fraction) = decimal(a)?;
    let (b_negative, b_integer, b_fraction) = decimal(b)?;
    let magnitude = a_integer
        .len()
        .cmp(&b_integer.len())
        .then_with(|| a_integer.cmp(b_integer))
        .then_with(|| a_fraction.cmp(b_fraction));
    Some(match (a_negative, b_negative) {
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(key: &str, cmp: &str, val: &str) -> FilterNode {
        FilterNode {
            key: key.into(),
            cmp: cmp.into(),
            val: val.into(),
            ..FilterNode::default()
        }
    }

    fn set(key: &str, cmp: &str, vals: &[&str]) -> FilterNode {
        FilterNode {
            key: key.into(),
            cmp: cmp.into(),
            vals: vals.iter().map(|v| (*v).into()).collect(),
            ..FilterNode::default()
        }
    }

    fn logic(op: &str, nodes: Vec<FilterNode>) -> FilterNode {
        FilterNode {
            op: op.into(),
            nodes,
            ..FilterNode::default()
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn comparisons() {
        let t = tags(&[("ticker", "BTC"), ("price", "50000.5"), ("xG", "0.80")]);
        let yes = |f: FilterNode| assert!(f.validate().is_ok() && f.matches(&t), "{f:?}");
        let no = |f: FilterNode| assert!(f.validate().is_ok() && !f.matches(&t), "{f:?}");
        yes(leaf("ticker", "eq", "BTC"));
        no(leaf("ticker", "eq", "ETH"));
        no(leaf("other", "eq", "BTC"));
        yes(leaf("ticker", "neq", "ETH"));
        yes(leaf("other", "neq", "ETH"));
        yes(set("ticker", "in", &["ETH", "BTC"]));
        no(set("other", "in", &["ETH", "BTC"]));
        yes(set("other", "in", &[""]));
        yes(set("ticker", "nin", &["ETH"]));
        no(set("ticker", "nin", &["BTC"]));
        yes(leaf("ticker", "ex", ""));
        no(leaf("other", "ex", ""));
        yes(leaf("other", "nex", ""));
        yes(leaf("ticker", "sw", "BT"));
        yes(leaf("ticker", "ew", "TC"));
        yes(leaf("ticker", "ct", "T"));
        no(leaf("other", "ct", "T"));
        yes(leaf("xG", "gte", "0.8"));
        no(leaf("xG", "gt", "0.8"));
        yes(leaf("price", "gt", "50000.49"));
        yes(leaf("price", "lt", "100000"));
        yes(leaf("price", "lte", "50000.50"));
        no(leaf("price", "lt", "-1"));
        no(leaf("ticker", "gt", "1"));
        no(leaf("price", "gt", "a lot"));
    }

    #[test]
    fn decimals_compare_exactly() {
        let cmp = |a, b| compare_decimals(a, b);
        assert_eq!(cmp("10", "9"), Some(Ordering::Greater));
        assert_eq!(cmp("0010.50", "10.5"), Some(Ordering::Equal));
        assert_eq!(cmp("-0", "0"), Some(Ordering::Equal));
        assert_eq!(cmp("-2", "-10"), Some(Ordering::Greater));
        assert_eq!(cmp("-0.5", "0.1"), Some(Ordering::Less));
        assert_eq!(cmp("0.5", "0.49"), Some(Ordering::Greater));
        assert_eq!(cmp("+1.0", "1"), Some(Ordering::Equal));
        assert_eq!(
            cmp("9007199254740993", "9007199254740992"),
            Some(Ordering::Greater),
            "beyond f64's integers"
        );
        let long = "1".repeat(201);
        let fine = format!("0.{}", "1".repeat(19));
        let too_fine = format!("0.{}", "1".repeat(20));
        assert_eq!(cmp(&fine, "0"), Some(Ordering::Greater));
        for bad in [
            "", "-", ".", "1e3", "1.2.3", "0x10", " 1", "1 ", "1.", ".5", "+.5", "-.5", "--1",
            &long, &too_fine,
        ] {
            assert_eq!(cmp(bad, "1"), None, "{bad:?}");
        }
    }

    #[test]
    fn logic_nodes() {
        let t = tags(&[("event", "shot"), ("xG", "0.9")]);
        let goal_or_big_chance = logic(
            "or",
            vec![
                leaf("event", "eq", "goal"),
                logic(
                    "and",
                    vec![leaf("event", "eq", "shot"), leaf("xG", "gte", "0.8")],
                ),
            ],
        );
        assert!(goal_or_big_chance.validate().is_ok());
        assert!(goal_or_big_chance.matches(&t));
        assert!(!goal_or_big_chance.matches(&tags(&[("event", "shot"), ("xG", "0.1")])));
        let not_shot = logic("not", vec![leaf("event", "eq", "shot")]);
        assert!(not_shot.validate().is_ok() && !not_shot.matches(&t));
        assert!(not_shot.matches(&BTreeMap::new()));
    }

    #[test]
    fn malformed_filters_are_refused() {
        for bad in [
            FilterNode::default(),
            leaf("k", "eq", ""),
            leaf("", "eq", "v"),
            leaf("k", "like", "v"),
            set("k", "eq", &["v"]),
            leaf("k", "in", "v"),
            leaf("k", "ex", "v"),
            logic("and", vec![]),
            logic("not", vec![leaf("a", "ex", ""), leaf("b", "ex", "")]),
            logic("xor", vec![leaf("a", "ex", "")]),
            FilterNode {
                nodes: vec![leaf("a", "ex", "")],
                ..leaf("k", "eq", "v")
            },
            logic("and", vec![leaf("k", "eq", "v"); 300]),
            (0..20).fold(leaf("k", "eq", "v"), |node, _| logic("not", vec![node])),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(
            leaf("", "ex", "").validate().is_ok(),
            "as Centrifugo: ex needs no key"
        );
    }
}
