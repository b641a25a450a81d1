//! ember-runtime
