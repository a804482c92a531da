//! User and group lookup by name, in one place: the config check
//! (`--check-config` refuses a user that does not exist) and the privilege
//! drop both ask here, so they can never disagree about a name.

use nix::unistd::{Group, User};

/// The passwd entry named `name`; None when there is none (or the lookup
/// itself failed, which for a config check is the same answer).
pub fn find_user(name: &str) -> Option<User> {
    User::from_name(name).ok().flatten()
}

/// The group entry named `name`, as [`find_user`].
pub fn find_group(name: &str) -> Option<Group> {
    Group::from_name(name).ok().flatten()
}
