//! Making patch bundles.
//!
//! Two ways in, one way out: [`handmade`] makes a bundle from a replacement object the
//! operator compiled by hand (`suture bundle`); [`source`] makes one from a source tree and a
//! fix (`suture build`). Both end in the same signed [`suture_bundle::Bundle`].

pub mod handmade;
pub mod source;

pub use handmade::{handmade_manifest, Handmade, Replace};
