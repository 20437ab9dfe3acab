//! Entity sets with an agent elevated into roles, kept with the snapshot.
//!
//! Applying an elevation means a copy of the bundle's entity set with the
//! role added to the agent's parents: Cedar's `Entities` is a plain map, so
//! the copy and the re-closure of the hierarchy cost time in proportion to
//! the number of entities (tens of milliseconds at 10,000). An elevation
//! lasts hours and a sidecar serves a handful of agents, so each
//! (agent, roles) set is built once per snapshot, by one caller while any
//! other waits for it, and shared after that. A reload drops them with the
//! snapshot. Sets are only kept up to [`CAPACITY`]; past that each decision
//! builds its own (correct, just slower).

use std::collections::HashMap;
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
    sets: Mutex<HashMap<Key, Arc<OnceLock<Built>>>>,
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
            let mut sets = self
                .sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match sets.get(&key) {
                Some(slot) => Some(slot.clone()),
                None if sets.len() < CAPACITY => {
                    let slot = Arc::new(OnceLock::new());
                    sets.insert(key, slot.clone());
                    Some(slot)
                }
                None => None,
            }
        };
        match slot {
            Some(slot) => slot.get_or_init(|| build().map(Arc::new)).clone(),
            None => build().map(Arc::new),
        }
    }

    /// How many elevated sets are kept.
    pub fn len(&self) -> usize {
        self.sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    fn builds_once_per_key_and_stops_keeping_at_capacity() {
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
        for i in 0..CAPACITY + 3 {
            let agent = uid(&format!("Agent::\"x{i}\""));
            cache.get_or_build(&agent, &role, build).expect("built");
            cache.get_or_build(&agent, &role, build).expect("built");
        }
        assert_eq!(cache.len(), CAPACITY);
        // Within capacity: built once; past it: built every time.
        assert_eq!(calls.get(), 2 + (CAPACITY - 2) + 2 * 5);
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
