//! [`Table`]: the registry's maps (rollouts, services), cheap to copy however long the history.
//!
//! The raft node publishes a copy of the registry to readers after every applied batch, and
//! checks each operator command against a copy before proposing it, so a copy must cost the
//! same with ten thousand finished rollouts as with one. A `Table` is a persistent B-tree
//! ([`imbl::OrdMap`]) of reference-counted records: copying it shares everything (O(1));
//! changing one record copies that record and the O(log n) tree nodes above it, nothing else.
//! A record changed in one copy is a different allocation from the other copy's, which is how
//! [`Table::changes_since`] finds what a snapshot must write without any bookkeeping.
//!
//! It serializes exactly as a `BTreeMap<K, V>` does, so stored registries read either way.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A sorted map of `K` to `V` with O(1) copies; see the module docs.
pub struct Table<K: Ord + Clone, V> {
    map: imbl::OrdMap<K, Arc<V>>,
}

/// One difference between two copies of a [`Table`] (see [`Table::changes_since`]).
#[derive(Debug, PartialEq)]
pub enum Change<'a, K, V> {
    /// The key is new, or its record changed: the current record.
    Put(&'a K, &'a V),
    /// The key is gone.
    Removed(&'a K),
}

impl<K: Ord + Clone, V: Clone> Table<K, V> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            map: imbl::OrdMap::new(),
        }
    }

    /// The record at `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get(key).map(|v| &**v)
    }

    /// The record at `key`, to change: copied first if another copy of the table shares it.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get_mut(key).map(Arc::make_mut)
    }

    /// Inserts or replaces the record at `key`.
    pub fn insert(&mut self, key: K, value: V) {
        self.map.insert(key, Arc::new(value));
    }

    /// The record at `key` to change, inserted from `make` first if there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        Arc::make_mut(self.map.entry(key).or_insert_with(|| Arc::new(make())))
    }

    /// Removes the record at `key`, returning whether there was one.
    pub fn remove<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.remove(key).is_some()
    }

    /// Whether `key` has a record.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.contains_key(key)
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys and records in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_ {
        self.map.iter().map(|(k, v)| (k, &**v))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + '_ {
        self.map.keys()
    }

    /// Records in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + '_ {
        self.map.values().map(|v| &**v)
    }

    /// What changed from `older` (an earlier copy of this table) to this one, in key order:
    /// records that are new or were changed since, and keys that are gone. A record counts as
    /// changed when it is no longer the same allocation, so this is exact for copies of one
    /// table and conservative (every record differs) for unrelated tables. One pass over both
    /// tables' keys, comparing pointers, never records.
    pub fn changes_since<'a>(&'a self, older: &'a Self) -> Vec<Change<'a, K, V>> {
        let mut changes = Vec::new();
        if self.map.ptr_eq(&older.map) {
            return changes;
        }
        let mut new = self.map.iter().peekable();
        let mut old = older.map.iter().peekable();
        loop {
            match (new.peek(), old.peek()) {
                (None, None) => break,
                (Some(&(k, v)), None) => {
                    changes.push(Change::Put(k, &**v));
                    new.next();
                }
                (None, Some(&(k, _))) => {
                    changes.push(Change::Removed(k));
                    old.next();
                }
                (Some(&(nk, nv)), Some(&(ok, ov))) => match nk.cmp(ok) {
                    std::cmp::Ordering::Less => {
                        changes.push(Change::Put(nk, &**nv));
                        new.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changes.push(Change::Removed(ok));
                        old.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(nv, ov) {
                            changes.push(Change::Put(nk, &**nv));
                        }
                        new.next();
                        old.next();
                    }
                },
            }
        }
        changes
    }
}

impl<K: Ord + Clone, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> Default for Table<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Clone + fmt::Debug, V: Clone + fmt::Debug> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for Table<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .map
                .iter()
                .zip(other.map.iter())
                .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for Table<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            map: iter.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        }
    }
}

impl<K, V, Q> std::ops::Index<&Q> for Table<K, V>
where
    K: Ord + Clone + Borrow<Q>,
    V: Clone,
    Q: Ord + ?Sized,
{
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no record for this key in the table")
    }
}

impl<K: Ord + Clone + Serialize, V: Clone + Serialize> Serialize for Table<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, K, V> Deserialize<'de> for Table<K, V>
where
    K: Ord + Clone + Deserialize<'de>,
    V: Clone + Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<K, V>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(u32, &str)]) -> Table<u32, String> {
        pairs.iter().map(|&(k, v)| (k, v.to_owned())).collect()
    }

    #[test]
    fn a_copy_shares_every_record_until_one_changes() {
        let mut a = table(&[(1, "one"), (2, "two"), (3, "three")]);
        let b = a.clone();
        assert!(a.changes_since(&b).is_empty());
        a.get_mut(&2).unwrap().push('!');
        assert_eq!(
            a.changes_since(&b),
            vec![Change::Put(&2, &"two!".to_owned())]
        );
        // The copy is untouched.
        assert_eq!(b[&2], "two");
        assert_eq!(
            b.changes_since(&a),
            vec![Change::Put(&2, &"two".to_owned())]
        );
    }

    #[test]
    fn changes_list_new_changed_and_removed_keys_in_order() {
        let mut a = table(&[(1, "one"), (3, "three"), (5, "five")]);
        let older = a.clone();
        a.insert(0, "zero".into());
        a.insert(4, "four".into());
        a.get_mut(&5).unwrap().clear();
        assert!(a.remove(&3));
        assert!(!a.remove(&9));
        let empty = String::new();
        assert_eq!(
            a.changes_since(&older),
            vec![
                Change::Put(&0, &"zero".to_owned()),
                Change::Removed(&3),
                Change::Put(&4, &"four".to_owned()),
                Change::Put(&5, &empty),
            ]
        );
        let gone = Table::<u32, String>::new();
        assert_eq!(
            gone.changes_since(&older),
            vec![
                Change::Removed(&1),
                Change::Removed(&3),
                Change::Removed(&5)
            ]
        );
    }

    #[test]
    fn unrelated_tables_with_equal_records_are_equal_but_all_changed() {
        let a = table(&[(1, "one"), (2, "two")]);
        let b = table(&[(1, "one"), (2, "two")]);
        assert_eq!(a, b);
        assert_eq!(a.changes_since(&b).len(), 2);
        assert_ne!(a, table(&[(1, "one")]));
        assert_ne!(a, table(&[(1, "one"), (2, "deux")]));
    }

    #[test]
    fn serializes_as_a_sorted_map() {
        let a = table(&[(2, "two"), (1, "one")]);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"1":"one","2":"two"}"#);
        let from_btree: std::collections::BTreeMap<u32, String> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(from_btree.len(), 2);
        let back: Table<u32, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }
}
