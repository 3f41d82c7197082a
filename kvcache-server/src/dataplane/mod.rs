//! The data plane: the kvcache frame protocol over TCP and the node's Unix socket.
//!
//! Data flows one way, top down: the [`connection`] loop routes each request to its handler;
//! handlers ([`hello`], [`inline`] for the ops whose bytes ride in the frames, [`session`] for
//! lease-get, staged put and release) import only [`request`] (the context, outcomes, replies)
//! and [`blocks`] (the store steps every byte path shares). [`unix`] attaches shared-memory
//! clients and [`rdma`] upgrades TCP connections; both then run the same loop with a
//! [`session::Session`].

pub mod blocks;
pub mod connection;
pub mod hello;
pub mod inline;
pub mod landing;
pub mod rdma;
pub mod request;
pub mod session;
pub mod unix;

#[cfg(test)]
mod tests;
