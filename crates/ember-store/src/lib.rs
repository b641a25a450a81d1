//! ember-store
