//! The CLI's commands on top of the library: they talk to a controller through
//! `lb_userspace::control::client` and show what it answers. Nothing in the library depends on
//! them.

pub mod status;
pub mod trace;
