//! Two-factor login and password changes: each check that must not race (a code step
//! used once, a recovery code used once, an enrolment confirmed with the secret it
//! showed) is made by the statement that records it.

use rusqlite::{Transaction, params};

use super::{Applied, Done, digest};
use crate::store::{DeletedAccount, StoreError, TokenHash};

pub(in crate::store::sqlite) enum SecurityOp {
    Begin {
        user_id: i64,
        secret: Vec<u8>,
    },
    Enable {
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
        codes: Vec<TokenHash>,
    },
    UseStep {
        user_id: i64,
        step: i64,
    },
    UseRecoveryCode {
        user_id: i64,
        code: TokenHash,
    },
    ReplaceRecoveryCodes {
        user_id: i64,
        codes: Vec<TokenHash>,
    },
    Disable {
        user_id: i64,
    },
    ChangePassword {
        user_id: i64,
        password_hash: String,
        keep: TokenHash,
    },
    DeleteAccount {
        user_id: i64,
    },
    Departed {
        users: Vec<i64>,
    },
}

pub(super) fn apply(tx: &Transaction, now: i64, op: &SecurityOp) -> Applied {
    match op {
        SecurityOp::DeleteAccount { user_id } => delete_account(tx, now, *user_id),
        SecurityOp::Departed { users } => {
            let mut done = tx.prepare_cached(
                "UPDATE users SET departed_at = ?2 WHERE id = ?1 AND deleted_at IS NOT NULL",
            )?;
            for user in users {
                done.execute([*user, now])?;
            }
            Ok(Done::Unit)
        }
        SecurityOp::Begin { user_id, secret } => {
            let n = tx
                .prepare_cached(
                    "INSERT INTO two_factor (user_id, secret, enabled, last_step, created_at)
                     VALUES (?1, ?2, 0, 0, ?3)
                     ON CONFLICT (user_id) DO UPDATE SET secret = ?2, created_at = ?3
                     WHERE enabled = 0",
                )?
                .execute(params![user_id, secret, now])?;
            Ok(Done::Changed(n == 1))
        }
        SecurityOp::Enable {
            user_id,
            secret,
            step,
            codes,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE two_factor SET enabled = 1, last_step = ?3
                     WHERE user_id = ?1 AND secret = ?2 AND enabled = 0",
                )?
                .execute(params![user_id, secret, step])?;
            if n == 1 {
                put_recovery_codes(tx, *user_id, codes)?;
            }
            Ok(Done::Changed(n == 1))
        }
        SecurityOp::UseStep { user_id, step } => {
            let n = tx
                .prepare_cached(
                    "UPDATE two_factor SET last_step = ?2
                     WHERE user_id = ?1 AND enabled = 1 AND last_step < ?2",
                )?
                .execute(params![user_id, step])?;
            Ok(Done::Changed(n == 1))
        }
        SecurityOp::UseRecoveryCode { user_id, code } => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM recovery_codes WHERE user_id = ?1 AND code_hash = ?2
                     AND EXISTS (SELECT 1 FROM two_factor WHERE user_id = ?1 AND enabled = 1)",
                )?
                .execute(params![user_id, &code[..]])?;
            Ok(Done::Changed(n == 1))
        }
        SecurityOp::ReplaceRecoveryCodes { user_id, codes } => {
            let on = tx
                .prepare_cached("SELECT 1 FROM two_factor WHERE user_id = ?1 AND enabled = 1")?
                .exists([user_id])?;
            if on {
                put_recovery_codes(tx, *user_id, codes)?;
            }
            Ok(Done::Changed(on))
        }
        SecurityOp::Disable { user_id } => {
            tx.prepare_cached("DELETE FROM two_factor WHERE user_id = ?1")?
                .execute([user_id])?;
            tx.prepare_cached("DELETE FROM recovery_codes WHERE user_id = ?1")?
                .execute([user_id])?;
            Ok(Done::Unit)
        }
        SecurityOp::ChangePassword {
            user_id,
            password_hash,
            keep,
        } => {
            let n = tx
                .prepare_cached("UPDATE users SET password_hash = ?2 WHERE id = ?1")?
                .execute(params![user_id, password_hash])?;
            if n == 0 {
                return Err(crate::store::StoreError::NotFound.into());
            }
            let ended = tx
                .prepare_cached(
                    "DELETE FROM sessions WHERE user_id = ?1 AND token_hash != ?2 RETURNING token_hash",
                )?
                .query_map(params![user_id, &keep[..]], |r| r.get::<_, Vec<u8>>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Done::Tokens(ended.into_iter().filter_map(digest).collect()))
        }
    }
}

/// The user and their bots lose what is theirs alone; their rows stay, as `deleted`.
fn delete_account(tx: &Transaction, now: i64, user_id: i64) -> Applied {
    let live = tx
        .prepare_cached("SELECT 1 FROM users WHERE id = ?1 AND deleted_at IS NULL")?
        .exists([user_id])?;
    if !live {
        return Err(StoreError::NotFound.into());
    }
    let mut users = vec![user_id];
    users.extend(
        tx.prepare_cached("SELECT id FROM users WHERE bot_owner = ?1 AND deleted_at IS NULL")?
            .query_map([user_id], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    );
    let mut tokens = Vec::new();
    for &id in &users {
        tx.prepare_cached(
            "UPDATE users SET deleted_at = ?2, username = 'deleted', display_name = NULL,
                 about = NULL, last_seen_at = NULL, password_hash = ''
             WHERE id = ?1",
        )?
        .execute([id, now])?;
        let sessions = tx
            .prepare_cached("DELETE FROM sessions WHERE user_id = ?1 RETURNING token_hash")?
            .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tokens.extend(sessions.into_iter().filter_map(digest).map(|t| (id, t)));
        let keys = tx
            .prepare_cached(
                "DELETE FROM api_keys WHERE owner_id = ?1 OR user_id = ?1
                 RETURNING user_id, token_hash",
            )?
            .query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tokens.extend(
            keys.into_iter()
                .filter_map(|(user, token)| Some((user, digest(token)?))),
        );
        tx.prepare_cached("DELETE FROM two_factor WHERE user_id = ?1")?
            .execute([id])?;
        tx.prepare_cached("DELETE FROM recovery_codes WHERE user_id = ?1")?
            .execute([id])?;
    }
    Ok(Done::Deleted(DeletedAccount { users, tokens }))
}

fn put_recovery_codes(tx: &Transaction, user_id: i64, codes: &[TokenHash]) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM recovery_codes WHERE user_id = ?1")?
        .execute([user_id])?;
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO recovery_codes (user_id, code_hash) VALUES (?1, ?2)",
    )?;
    for code in codes {
        insert.execute(params![user_id, &code[..]])?;
    }
    Ok(())
}
