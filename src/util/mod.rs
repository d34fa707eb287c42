//! General helpers at the bottom of the crate: they import nothing from the gateway's parts,
//! and every part may use them.

pub mod chain;
pub mod sync;
pub mod time;
