//! The REST API of NovaCron: auth, tenancy, errors, routes; talks to the cluster through ControlPlane.
