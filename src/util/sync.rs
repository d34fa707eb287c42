//! Lock helpers.
