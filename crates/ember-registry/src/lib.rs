//! ember-registry
