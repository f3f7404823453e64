//! A count of the work `apply` does: one unit per task or instance it visits and per index entry
//! it adds or removes. Tests bound it by the number of tasks a command touches, so that a command
//! whose cost grows faster than what it touches (a rescan of a whole job per task, say) fails a
//! test instead of stopping a master. Per thread, so concurrent tests do not mix their counts;
//! always on (one thread-local addition per unit, next to a map operation that costs far more).

use std::cell::Cell;

thread_local! {
    static UNITS: Cell<u64> = const { Cell::new(0) };
}

/// Records `n` units of work done on this thread.
#[inline]
pub(crate) fn add(n: u64) {
    UNITS.with(|u| u.set(u.get().wrapping_add(n)));
}

/// The units of work done on this thread so far (take the difference around a call).
pub fn units() -> u64 {
    UNITS.with(|u| u.get())
}
