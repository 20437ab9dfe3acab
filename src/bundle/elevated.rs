//! Entity sets with an agent elevated into roles, kept with the snapshot.
//!
//! Applying an elevation means a copy of the bundle's entity set with the
//! role added to the agent's parents: Cedar's `Entities` is a plain map, so
//! the copy and the re-closure of the hierarchy cost time in proportion to
//! the number of entities (tens of milliseconds at 10,000). An elevation
//! lasts hours and a sidecar serves a handful of agents, so each
//! (agent, roles) set is built once per snapshot, by one caller while any
//! other waits for it, and shared after that. A reload drops them with the
//! snapshot. At most [`CAPACITY`] sets are kept: a new one displaces the
//! oldest, so sets of elevations long expired do not hold their places.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use cedar_policy::{Entities, EntityUid};

/// Elevated entity sets kept per snapshot. Each holds a map entry per entity
/// of the bundle (the entities themselves are shared), so the bound keeps
/// memory to a few copies of the bundle's index.
pub const CAPACITY: usize = 16;

type Key = (EntityUid, Vec<EntityUid>);
type Built = Result<Arc<Entities>, String>;

#[derive(Debug, Default)]
pub struct ElevatedEntities {
    sets: Mutex<Kept>,
}

/// The sets, and their keys oldest first.
#[derive(Debug, Default)]
struct Kept {
    sets: HashMap<Key, Arc<OnceLock<Built>>>,
    order: VecDeque<Key>,
}

impl ElevatedEntities {
    /// The entity set with `agent` in `roles` (sorted and deduplicated),
    /// built by `build` the first time it is asked for.
    pub fn get_or_build(
        &self,
        agent: &EntityUid,
        roles: &[EntityUid],
        build: impl FnOnce() -> Result<Entities, String>,
    ) -> Built {
        let key: Key = (agent.clone(), roles.to_vec());
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is still whole, so it is used as is.
        let slot = {
            let mut kept = self
                .sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match kept.sets.get(&key) {
                Some(slot) => slot.clone(),
                None => {
                    if kept.sets.len() >= CAPACITY {
                        if let Some(oldest) = kept.order.pop_front() {
                            kept.sets.remove(&oldest);
                        }
                    }
                    let slot = Arc::new(OnceLock::new());
                    kept.sets.insert(key.clone(), slot.clone());
                    kept.order.push_back(key);
                    slot
                }
            }
        };
        // Built outside the lock: one caller builds, others with the same
        // key wait for it, others with other keys go on.
        slot.get_or_init(|| build().map(Arc::new)).clone()
    }

    /// How many elevated sets are kept.
    pub fn len(&self) -> usize {
        self.sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sets
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn uid(s: &str) -> EntityUid {
        EntityUid::from_str(s).expect("uid")
    }

    #[test]
    fn builds_once_per_key_and_displaces_the_oldest_at_capacity() {
        let cache = ElevatedEntities::default();
        let calls = std::cell::Cell::new(0);
        let build = || {
            calls.set(calls.get() + 1);
            Ok(Entities::empty())
        };
        let role = [uid("AgentRole::\"r\"")];
        let a = uid("Agent::\"a\"");
        cache.get_or_build(&a, &role, build).expect("built");
        cache.get_or_build(&a, &role, build).expect("kept");
        assert_eq!(calls.get(), 1);
        cache.get_or_build(&a, &[], build).expect("another key");
        assert_eq!((calls.get(), cache.len()), (2, 2));
        // CAPACITY more keys: each built once, and the first two displaced.
        for i in 0..CAPACITY {
            let agent = uid(&format!("Agent::\"x{i}\""));
            cache.get_or_build(&agent, &role, build).expect("built");
            cache.get_or_build(&agent, &role, build).expect("kept");
        }
        assert_eq!((calls.get(), cache.len()), (2 + CAPACITY, CAPACITY));
        cache.get_or_build(&a, &role, build).expect("built again");
        assert_eq!(calls.get(), 3 + CAPACITY);
        // An error is kept like a set: the same snapshot gives the same answer.
        let failing = || Err::<Entities, _>("no".to_owned());
        let fresh = ElevatedEntities::default();
        assert_eq!(
            fresh.get_or_build(&a, &role, failing).err(),
            Some("no".to_owned())
        );
        assert_eq!(
            fresh.get_or_build(&a, &role, build).err(),
            Some("no".to_owned())
        );
    }
}
