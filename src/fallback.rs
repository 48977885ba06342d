//! The portable fallback, used wherever patching is not compiled in (every target but x86-64
//! Linux, or with the `force-fallback` feature): a call is an atomic load of the key's target
//! and an indirect call (see `StaticCallKey::__site` and `__private::field_site`), and `update`
//! is one store. There are no sites to list and nothing to flush.

use crate::diagnostics::{Disabled, Error, SiteInfo, Stats, Status, WorkerStatus};
use crate::key::{RawKey, RawTarget};

pub(crate) fn update(changes: &[(&RawKey, RawTarget)]) -> Result<(), Error> {
    // `set_target` stores with Release, pairing with the Acquire load of every call: a call
    // that starts after `update` returned (and is ordered after it) reaches the new target.
    for &(key, target) in changes {
        key.set_target(target);
    }
    Ok(())
}

pub(crate) fn sites(_: &RawKey) -> Vec<SiteInfo> {
    Vec::new()
}

pub(crate) fn flush() {}

pub(crate) fn init() {}

pub(crate) fn status() -> Status {
    Status {
        patching: Err(Disabled::Unsupported),
        worker: WorkerStatus::NotStarted,
        sites: 0,
        capacity: 0,
        registry_full: false,
        thunks: 0,
        thunk_error: None,
        guards: false,
        stubs: 0,
    }
}

pub(crate) fn run_time_sites() -> Vec<SiteInfo> {
    Vec::new()
}

pub(crate) fn stats() -> Stats {
    Stats::default()
}

pub(crate) fn unpatch_all() -> Result<(), Error> {
    Ok(())
}
