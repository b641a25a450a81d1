//! ember-testkit
