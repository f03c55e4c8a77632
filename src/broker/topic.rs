//! Topic matching: a trie over dot-separated words, with `*` (exactly one
//! word) and `#` (zero or more words) edges. Publishing walks the trie once
//! instead of testing each binding's pattern.

use std::collections::HashMap;

/// A trie of binding patterns; `T` is what a binding points at.
#[derive(Debug, Clone)]
pub struct TopicTrie<T> {
    root: Node<T>,
}

#[derive(Debug, Clone)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
        }
    }
}

impl<T: Clone> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` under `pattern`.
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
        for w in words(pattern) {
            node = match w {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
    }

    /// Calls `f` for every value whose pattern matches `key` (a value bound
    /// under several matching patterns is reported once per pattern).
    pub fn for_each_match(&self, key: &str, mut f: impl FnMut(&T)) {
        let words: Vec<&str> = words(key).collect();
        Self::walk(&self.root, &words, &mut f);
    }

    fn walk(node: &Node<T>, words: &[&str], f: &mut impl FnMut(&T)) {
        if let Some(h) = &node.hash {
            // '#' swallows 0..=len words.
            for i in 0..=words.len() {
                Self::walk(h, &words[i..], f);
            }
        }
        match words.split_first() {
            None => node.values.iter().for_each(|v| f(v)),
            Some((w, rest)) => {
                if let Some(n) = node.words.get(*w) {
                    Self::walk(n, rest, f);
                }
                if let Some(s) = &node.star {
                    Self::walk(s, rest, f);
                }
            }
        }
    }
}

/// Splits a key or pattern into words; as in RabbitMQ, "" has no words.
fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split('.').filter(move |_| !s.is_empty())
}

/// Reference matcher: does `pattern` match `key`? (Used by tests and as the
/// definition the trie must agree with.)
pub fn matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = words(pattern).collect();
    let k: Vec<&str> = words(key).collect();
    go(&p, &k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trie_matches(pattern: &str, key: &str) -> bool {
        let mut t = TopicTrie::new();
        t.insert(pattern, ());
        let mut hit = false;
        t.for_each_match(key, |_| hit = true);
        hit
    }

    #[test]
    fn rabbitmq_tutorial_table() {
        let cases = [
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "quick.orange.rabbit", true),
            ("lazy.#", "lazy.orange.elephant", true),
            ("*.orange.*", "quick.orange.fox", true),
            ("lazy.#", "lazy.brown.fox", true),
            ("*.*.rabbit", "lazy.pink.rabbit", true),
            ("*.orange.*", "quick.brown.fox", false),
            ("*.orange.*", "orange", false),
            ("*.orange.*", "quick.orange.new.rabbit", false),
            ("lazy.#", "lazy.orange.new.rabbit", true),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.*.b", "a.b", false),
            ("", "", true),
            ("a", "", false),
            ("#.#", "a", true),
            ("*", "", false),
            ("*.#", "", false),
            ("#", "", true),
            ("", "a", false),
        ];
        for (p, k, want) in cases {
            assert_eq!(matches(p, k), want, "reference {p} vs {k}");
            assert_eq!(trie_matches(p, k), want, "trie {p} vs {k}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ]
    }
    fn pword() -> impl Strategy<Value = String> {
        prop_oneof![3 => word(), 1 => Just("*".to_string()), 1 => Just("#".to_string())]
    }

    proptest! {
        #[test]
        fn trie_agrees_with_reference(p in proptest::collection::vec(pword(), 0..5), k in proptest::collection::vec(word(), 0..6)) {
            let p = p.join(".");
            let k = k.join(".");
            prop_assert_eq!(trie_matches(&p, &k), matches(&p, &k));
        }

        #[test]
        fn many_patterns_report_each_match(ps in proptest::collection::vec(proptest::collection::vec(pword(), 0..4), 1..8), k in proptest::collection::vec(word(), 0..5)) {
            let k = k.join(".");
            let mut t = TopicTrie::new();
            for (i, p) in ps.iter().enumerate() { t.insert(&p.join("."), i); }
            let mut got = std::collections::BTreeSet::new();
            t.for_each_match(&k, |i| { got.insert(*i); });
            let want: std::collections::BTreeSet<usize> = ps.iter().enumerate().filter(|(_, p)| matches(&p.join("."), &k)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want);
        }
    }
}
