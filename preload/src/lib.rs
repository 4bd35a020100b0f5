//! `libleakhunt.so`: preload it into a program to record every allocation and free, with the
//! allocation's stack, into a trace (a file, or a socket to `leakhunt run`).
//!
//! The boundary: `api` holds every exported symbol (thin shims); `tracer` is the core they call;
//! `unsafe` is confined to these modules and each block says why it holds. See DESIGN notes in
//! `tracer` for the hot-path contract.

#![cfg_attr(test, allow(dead_code, non_snake_case))] // unit tests build the shims unexported, so unused

// The unwinder reads x86-64 registers, and the rings' give-back handshake relies on x86-64's
// locked instructions ordering a store before a later load (see `ring::Ring::hold`).
#[cfg(not(target_arch = "x86_64"))]
compile_error!("libleakhunt is built for x86-64 only");

mod api;
mod config;
mod control;
mod dedup;
mod env;
mod fds;
mod helper;
mod jit;
mod modules;
mod out;
mod python;
mod real;
mod ring;
mod side;
mod signals;
mod sys;
mod tls;
mod tracer;
mod unwind;

#[cfg(not(test))]
#[global_allocator]
static ALLOC: real::RealAlloc = real::RealAlloc;

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = tracer::constructor;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static DESTRUCTOR: extern "C" fn() = tracer::destructor;
