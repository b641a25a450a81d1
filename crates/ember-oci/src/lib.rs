//! ember-oci
