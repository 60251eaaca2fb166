//! What the sidecars share: their Unix socket.

use std::path::Path;

use crate::forge::SidecarError;

/// Binds a sidecar's socket: removes a stale socket file first (refusing one another
/// process still serves), and makes it mode 0666, because the bottle's uid connects
/// through a bind mount (the state directory above `run/` is private to this user).
pub(crate) async fn bind(socket: &Path) -> Result<tokio::net::UnixListener, SidecarError> {
    let bind_err = |source| SidecarError::Bind {
        path: socket.to_path_buf(),
        source,
    };
    if std::fs::symlink_metadata(socket).is_ok() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Err(SidecarError::SocketInUse {
                path: socket.to_path_buf(),
            });
        }
        std::fs::remove_file(socket).map_err(bind_err)?;
    }
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(listener)
}
