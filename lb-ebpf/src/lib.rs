//! Host-side stub: lets `lb-userspace` name this crate as a build-dependency so cargo rebuilds
//! the XDP object whenever the program changes. The program itself is `src/main.rs`.
#![no_std]
