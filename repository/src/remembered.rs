//! `Remembered`: the outcomes an actor keeps per id, so a repeated or late message is answered
//! from them instead of acting again.
//!
//! Invariant: it holds at most its capacity, and forgets in insertion order, the oldest first;
//! a new value for a key it holds keeps that key's place. It knows nothing of the actor: what
//! is still running lives outside it and is never forgotten.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A bounded map of outcomes, forgetting the oldest first.
#[derive(Debug, Clone)]
pub struct Remembered<K, V> {
    capacity: usize,
    values: HashMap<K, V>,
    /// Every key of `values`, oldest first.
    order: VecDeque<K>,
}

impl<K: Eq + Hash + Clone, V> Remembered<K, V> {
    /// Remembers up to `capacity` outcomes (at least one).
    pub fn new(capacity: usize) -> Remembered<K, V> {
        Remembered {
            capacity: capacity.max(1),
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.values.get(key)
    }

    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.values.contains_key(key)
    }

    /// Remembers `value` for `key`, forgetting the oldest outcome if that makes one too many.
    pub fn insert(&mut self, key: K, value: V) {
        if self.values.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.values.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_past_its_capacity() {
        let mut remembered = Remembered::new(3);
        for i in 0..5u32 {
            remembered.insert(i.to_string(), i);
        }
        assert_eq!(remembered.len(), 3);
        assert!(!remembered.contains("0") && !remembered.contains("1"));
        assert_eq!(remembered.get("2"), Some(&2));
        assert_eq!(remembered.get("4"), Some(&4));
    }

    #[test]
    fn a_new_value_for_a_known_key_keeps_its_place() {
        let mut remembered = Remembered::new(2);
        remembered.insert("a", 1);
        remembered.insert("b", 2);
        remembered.insert("a", 3);
        assert_eq!(remembered.len(), 2);
        assert_eq!(remembered.get("a"), Some(&3));
        // "a" is still the oldest, so it goes first.
        remembered.insert("c", 4);
        assert!(!remembered.contains("a"));
        assert_eq!(remembered.get("b"), Some(&2));
        assert_eq!(remembered.get("c"), Some(&4));
    }

    #[test]
    fn a_zero_capacity_still_remembers_the_latest() {
        let mut remembered = Remembered::new(0);
        remembered.insert(1, "one");
        remembered.insert(2, "two");
        assert_eq!(remembered.len(), 1);
        assert_eq!(remembered.get(&2), Some(&"two"));
        assert!(!remembered.is_empty());
    }
}
