//! One behavioural suite every store backend must pass. Each check takes a fresh, empty
//! store; `tests/store.rs` runs them against SQLite, and a PostgreSQL backend runs the same
//! functions.

use crate::model::{ChannelKind, EventBody, HistoryQuery, Role};
use crate::store::{ReadFence, Store, StoreError};

/// Every check, by name, for a backend's test file to run one by one.
pub const CHECKS: &[&str] = &[
    "users",
    "sessions",
    "channel_log_is_gap_free",
    "client_id_is_idempotent",
    "broadcast_permissions",
    "member_management",
    "unread_counts",
    "history_pages",
    "dm_is_one_per_pair",
    "delete_redacts",
    "edits_keep_each_version_in_the_log",
    "reactions",
    "reaction_limits_and_deletes",
    "threads",
    "mentions",
    "profiles",
    "search",
    "bots_and_api_keys",
    "incoming_webhooks",
    "subscription_leases",
    "uploads",
    "two_factor_and_passwords",
    "authored",
    "account_deletion",
];

/// Runs the check called `name` against `store`.
pub async fn run(name: &str, store: &dyn Store) {
    match name {
        "users" => users(store).await,
        "sessions" => sessions(store).await,
        "channel_log_is_gap_free" => channel_log_is_gap_free(store).await,
        "client_id_is_idempotent" => client_id_is_idempotent(store).await,
        "broadcast_permissions" => broadcast_permissions(store).await,
        "member_management" => member_management(store).await,
        "unread_counts" => unread_counts(store).await,
        "history_pages" => history_pages(store).await,
        "dm_is_one_per_pair" => dm_is_one_per_pair(store).await,
        "delete_redacts" => delete_redacts(store).await,
        "edits_keep_each_version_in_the_log" => edits_keep_each_version_in_the_log(store).await,
        "reactions" => reactions(store).await,
        "reaction_limits_and_deletes" => reaction_limits_and_deletes(store).await,
        "threads" => threads(store).await,
        "mentions" => mentions(store).await,
        "profiles" => profiles(store).await,
        "search" => search(store).await,
        "bots_and_api_keys" => bots_and_api_keys(store).await,
        "incoming_webhooks" => incoming_webhooks(store).await,
        "subscription_leases" => subscription_leases(store).await,
        "uploads" => uploads(store).await,
        "two_factor_and_passwords" => two_factor_and_passwords(store).await,
        "authored" => authored(store).await,
        "account_deletion" => account_deletion(store).await,
        other => panic!("no conformance check {other}"),
    }
}

/// Two-factor login: an enrolment waits for its confirmation (with the secret it showed),
/// a code's step is used once and never an earlier one, a recovery code once; turning it
/// off deletes it all. A password change ends every other session in the same write.
async fn two_factor_and_passwords(store: &dyn Store) {
    let id = user(store, "tess").await;
    let other = user(store, "otto").await;
    assert_eq!(store.two_factor(id).await.unwrap(), None);
    // Nothing to use while it is off.
    assert!(!store.use_code_step(id, 5).await.unwrap());
    assert!(!store.use_recovery_code(id, [9; 32]).await.unwrap());
    assert!(
        !store
            .replace_recovery_codes(id, vec![[9; 32]])
            .await
            .unwrap()
    );
    assert!(store.begin_two_factor(id, b"first".to_vec()).await.unwrap());
    assert!(
        store
            .begin_two_factor(id, b"second".to_vec())
            .await
            .unwrap()
    );
    let waiting = store.two_factor(id).await.unwrap().unwrap();
    assert_eq!(
        (
            waiting.secret.as_slice(),
            waiting.enabled,
            waiting.recovery_codes
        ),
        (&b"second"[..], false, 0)
    );
    // A confirmation of the replaced enrolment does nothing.
    assert!(
        !store
            .enable_two_factor(id, b"first".to_vec(), 10, vec![[1; 32]])
            .await
            .unwrap()
    );
    assert!(!store.use_code_step(id, 11).await.unwrap(), "not on yet");
    let codes: Vec<[u8; 32]> = (1..=10).map(|i| [i; 32]).collect();
    assert!(
        store
            .enable_two_factor(id, b"second".to_vec(), 10, codes)
            .await
            .unwrap()
    );
    let on = store.two_factor(id).await.unwrap().unwrap();
    assert_eq!(
        (on.enabled, on.last_step, on.recovery_codes),
        (true, 10, 10)
    );
    // On: a new enrolment cannot replace it, nor can the old one be confirmed again.
    assert!(!store.begin_two_factor(id, b"third".to_vec()).await.unwrap());
    assert!(
        !store
            .enable_two_factor(id, b"second".to_vec(), 20, vec![])
            .await
            .unwrap()
    );
    // Steps: the confirming one and earlier are used; a later one once.
    assert!(!store.use_code_step(id, 10).await.unwrap());
    assert!(!store.use_code_step(id, 9).await.unwrap());
    assert!(store.use_code_step(id, 11).await.unwrap());
    assert!(!store.use_code_step(id, 11).await.unwrap());
    assert!(
        !store.use_code_step(other, 12).await.unwrap(),
        "another user's is off"
    );
    // Recovery codes: each once, and only the user's own.
    assert!(!store.use_recovery_code(other, [3; 32]).await.unwrap());
    assert!(store.use_recovery_code(id, [3; 32]).await.unwrap());
    assert!(!store.use_recovery_code(id, [3; 32]).await.unwrap());
    assert!(!store.use_recovery_code(id, [11; 32]).await.unwrap());
    assert_eq!(
        store.two_factor(id).await.unwrap().unwrap().recovery_codes,
        9
    );
    assert!(
        store
            .replace_recovery_codes(id, vec![[20; 32], [21; 32]])
            .await
            .unwrap()
    );
    assert!(
        !store.use_recovery_code(id, [4; 32]).await.unwrap(),
        "old codes are gone"
    );
    assert!(store.use_recovery_code(id, [20; 32]).await.unwrap());
    store.disable_two_factor(id).await.unwrap();
    assert_eq!(store.two_factor(id).await.unwrap(), None);
    assert!(!store.use_recovery_code(id, [21; 32]).await.unwrap());
    // Re-enrolment starts over.
    assert!(
        store
            .begin_two_factor(id, b"fourth".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(store.two_factor(id).await.unwrap().unwrap().last_step, 0);

    // A password change ends every other session of the user, and no one else's.
    for (token, user) in [
        ([1u8; 32], id),
        ([2; 32], id),
        ([3; 32], id),
        ([4; 32], other),
    ] {
        store
            .create_session(user, new_session(token, i64::MAX))
            .await
            .unwrap();
    }
    let mut ended = store
        .change_password(id, "new hash", [2; 32])
        .await
        .unwrap();
    ended.sort();
    assert_eq!(ended, vec![[1; 32], [3; 32]]);
    let (_, hash) = store.credentials("tess").await.unwrap().unwrap();
    assert_eq!(hash, "new hash");
    assert!(store.session_user([2; 32], 0).await.unwrap().is_some());
    assert!(store.session_user([1; 32], 0).await.unwrap().is_none());
    assert!(store.session_user([4; 32], 0).await.unwrap().is_some());
    assert!(matches!(
        store.change_password(i64::MAX, "h", [0; 32]).await,
        Err(StoreError::NotFound)
    ));
}

/// A user's own messages, for their export: every live one they wrote, in channels they
/// left too, by id, paged; not others', not deleted ones; each read sees every
/// acknowledged send.
async fn authored(store: &dyn Store) {
    let me = user(store, "writer").await;
    let other = user(store, "other").await;
    let a = store
        .create_channel(me, ChannelKind::Group, "a", &[other])
        .await
        .unwrap()
        .id;
    let b = store
        .create_channel(other, ChannelKind::Group, "b", &[me])
        .await
        .unwrap()
        .id;
    let mut mine = Vec::new();
    for i in 0..7 {
        let ch = if i % 2 == 0 { a } else { b };
        mine.push(
            store
                .post_message(me, ch, &format!("m{i}"), None)
                .await
                .unwrap()
                .message
                .id,
        );
        store.post_message(other, ch, "theirs", None).await.unwrap();
    }
    let deleted = mine.remove(3);
    store.delete_message(me, b, deleted).await.unwrap();
    store.remove_member(me, b, me).await.unwrap();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.authored(me, after, 2).await.unwrap();
        assert!(page.items.len() <= 2);
        assert!(page.items.iter().all(|m| m.author_id == me && !m.deleted));
        seen.extend(page.items.iter().map(|m| m.id));
        let Some(last) = page.items.last() else { break };
        after = last.id;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, mine);
    assert!(
        store
            .authored(i64::MAX, 0, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// Deleting an account: its row stays as `deleted` (no name lookup, no login, no new
/// session, no new channel), its sessions and keys (and its bots') end with their
/// digests given back; leaving a channel passes an owner's role to the first admin,
/// keeps DMs, and is idempotent; departures are recorded.
async fn account_deletion(store: &dyn Store) {
    let gone = user(store, "leaver").await;
    let admin = user(store, "admin").await;
    let member = user(store, "member").await;
    let bot = store.create_bot(gone, "leavers_bot").await.unwrap().id;
    store
        .create_session(gone, new_session([1; 32], i64::MAX))
        .await
        .unwrap();
    store
        .create_session(member, new_session([2; 32], i64::MAX))
        .await
        .unwrap();
    let key = crate::store::NewApiKey {
        token: [3; 32],
        user_id: bot,
        name: "k".into(),
        scopes: "users:read".into(),
        expires_at: None,
    };
    store.create_api_key(gone, key).await.unwrap();
    assert!(store.begin_two_factor(gone, b"s".to_vec()).await.unwrap());
    // "owned" is the leaver's (its bot is the one admin, deleted with it: the role
    // passes over it to the first member by id); "other" is someone else's; a DM with
    // the member.
    let owned = store
        .create_channel(gone, ChannelKind::Group, "owned", &[member, admin])
        .await
        .unwrap()
        .id;
    store
        .put_member(gone, owned, bot, Some(Role::Admin))
        .await
        .unwrap();
    let other = store
        .create_channel(member, ChannelKind::Group, "other", &[gone])
        .await
        .unwrap()
        .id;
    let (dm, _) = store.open_dm(gone, member).await.unwrap();
    store
        .post_message(gone, owned, "stays", None)
        .await
        .unwrap();

    let mut deleted = store.delete_account(gone).await.unwrap();
    deleted.tokens.sort();
    assert_eq!(deleted.users, vec![gone, bot]);
    assert_eq!(deleted.tokens, vec![(gone, [1; 32]), (bot, [3; 32])]);
    assert!(matches!(
        store.delete_account(gone).await,
        Err(StoreError::NotFound)
    ));
    let row = store.user(gone).await.unwrap().unwrap();
    assert!(row.deleted && row.username == "deleted" && row.display_name.is_none());
    assert!(store.user(bot).await.unwrap().unwrap().deleted);
    assert!(store.user_by_username("leaver").await.unwrap().is_none());
    assert!(store.credentials("leaver").await.unwrap().is_none());
    assert!(store.session_user([1; 32], 0).await.unwrap().is_none());
    assert!(store.session_user([2; 32], 0).await.unwrap().is_some());
    assert!(store.key_user([3; 32], 0).await.unwrap().is_none());
    assert_eq!(store.two_factor(gone).await.unwrap(), None);
    assert!(matches!(
        store
            .create_session(gone, new_session([4; 32], i64::MAX))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(store.put_member(member, other, bot, None).await.is_err());
    assert!(store.open_dm(admin, gone).await.is_err());
    assert_eq!(store.departing().await.unwrap().len(), 2);

    // Leaving: the owned channel passes to its admin; the DM stays; twice is once.
    assert!(store.depart(gone, owned, &[gone, bot]).await.unwrap());
    assert!(!store.depart(gone, owned, &[gone, bot]).await.unwrap());
    assert!(store.depart(gone, other, &[gone, bot]).await.unwrap());
    assert!(!store.depart(gone, dm.id, &[gone, bot]).await.unwrap());
    let roles: Vec<(i64, Role)> = store
        .members(admin, owned)
        .await
        .unwrap()
        .iter()
        .map(|m| (m.user.id, m.role))
        .collect();
    assert!(roles.contains(&(admin, Role::Owner)), "{roles:?}");
    assert!(!roles.iter().any(|(id, _)| *id == gone));
    let (channel, _) = store.channel(owned, admin).await.unwrap().unwrap();
    assert_eq!(channel.owner_id, admin);
    let log = store.log(owned, 0, 100, ReadFence::PRIMARY).await.unwrap();
    let tail: Vec<&EventBody> = log.items.iter().rev().take(2).map(|e| &e.body).collect();
    assert_eq!(
        tail,
        [
            &EventBody::MemberRemoved { user_id: gone },
            &EventBody::MemberUpdated {
                user_id: admin,
                role: Role::Owner
            },
        ]
    );
    let dm_members = store.members(member, dm.id).await.unwrap();
    assert!(
        dm_members
            .iter()
            .any(|m| m.user.id == gone && m.user.deleted)
    );
    // Its message stays, under its id.
    let newest = HistoryQuery {
        before_seq: None,
        after_seq: None,
        limit: 50,
    };
    let kept = store
        .history(owned, newest, ReadFence::PRIMARY)
        .await
        .unwrap();
    assert!(
        kept.items
            .iter()
            .any(|m| m.author_id == gone && m.text == "stays")
    );
    store.departed(&[gone, bot]).await.unwrap();
    assert!(store.departing().await.unwrap().is_empty());
}

fn new_upload(owner_id: i64, seed: char) -> crate::store::NewUpload {
    crate::store::NewUpload {
        owner_id,
        sha256: seed.to_string().repeat(64),
        size: 100,
        content_type: "image/png".into(),
        name: format!("{seed}.png"),
        width: Some(4),
        height: Some(3),
        thumb_sha256: Some("f".repeat(64)),
    }
}

/// Uploads: recorded, attached by their uploader only (at most 10, each once), carried
/// into the message and its event, readable in the channels of messages that carry
/// them, dropped from a deleted message, and collected only when old and carried by no
/// message.
async fn uploads(store: &dyn Store) {
    let owner = user(store, "owner").await;
    let member = user(store, "member").await;
    let ch = store
        .create_channel(owner, ChannelKind::Group, "g", &[member])
        .await
        .unwrap()
        .id;
    let a = store.create_upload(new_upload(owner, 'a')).await.unwrap();
    assert_eq!(store.upload(a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(a.thumb_sha256.as_deref(), Some("f".repeat(64).as_str()));
    let b = store.create_upload(new_upload(owner, 'b')).await.unwrap();
    let theirs = store.create_upload(new_upload(member, 'c')).await.unwrap();
    assert_eq!(store.upload_bytes(owner).await.unwrap(), 200);
    assert!(store.upload(i64::MAX).await.unwrap().is_none());
    assert!(matches!(
        store.create_upload(new_upload(i64::MAX, 'd')).await,
        Err(StoreError::NotFound)
    ));
    for refused in [
        vec![theirs.id],
        vec![a.id, a.id],
        vec![i64::MAX],
        vec![a.id; 11],
    ] {
        assert!(
            matches!(
                store
                    .post_with_files(owner, ch, None, "x", None, &refused, 0)
                    .await,
                Err(StoreError::Invalid {
                    field: "attachments",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    // An upload older than the caller's cutoff is not attached.
    assert!(matches!(
        store
            .post_with_files(owner, ch, None, "x", None, &[a.id], a.created_at + 1)
            .await,
        Err(StoreError::Invalid {
            field: "attachments",
            ..
        })
    ));
    assert!(store.upload_channels(a.id).await.unwrap().is_empty());
    let posted = store
        .post_with_files(owner, ch, None, "", Some("files-1"), &[b.id, a.id], 0)
        .await
        .unwrap();
    let names: Vec<&str> = posted
        .message
        .attachments
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["b.png", "a.png"]);
    assert_eq!(posted.message.attachments[1], a.attachment());
    // A retry answers the original whatever it names.
    let again = store
        .post_with_files(owner, ch, None, "", Some("files-1"), &[a.id], 0)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.message.attachments.len(), 2);
    // A reply carries files too.
    let reply = store
        .post_with_files(owner, ch, Some(posted.message.id), "re", None, &[a.id], 0)
        .await
        .unwrap();
    assert_eq!(reply.message.thread_root_id, Some(posted.message.id));
    let read = store.message(ch, posted.message.id).await.unwrap().unwrap();
    assert_eq!(read.attachments, posted.message.attachments);
    let page = store.log(ch, 0, 100, ReadFence::PRIMARY).await.unwrap();
    let created = page
        .items
        .iter()
        .find_map(|e| match &e.body {
            EventBody::MessageCreated(m) if m.id == posted.message.id => Some(m.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(created.attachments, posted.message.attachments);
    assert_eq!(store.upload_channels(a.id).await.unwrap(), [ch]);

    // Nothing carried or young is collected.
    let now = crate::clock::now_ms();
    let young = store.collect_uploads(now - 60_000, 0, 100).await.unwrap();
    assert_eq!(young.deleted, 0);
    assert_eq!(young.next_after, None);
    // Deleting the root leaves `a` carried by the reply only; `b` by nothing.
    store
        .delete_message(owner, ch, posted.message.id)
        .await
        .unwrap();
    let read = store.message(ch, posted.message.id).await.unwrap().unwrap();
    assert!(read.attachments.is_empty());
    assert!(store.upload_channels(b.id).await.unwrap().is_empty());
    assert_eq!(store.upload_channels(a.id).await.unwrap(), [ch]);
    // Paged: one upload looked at per step.
    let mut after = 0;
    let mut deleted = 0;
    let mut digests = Vec::new();
    for _ in 0..10 {
        let step = store.collect_uploads(now + 1, after, 1).await.unwrap();
        deleted += step.deleted;
        digests.extend(step.digests);
        match step.next_after {
            Some(next) => after = next,
            None => break,
        }
    }
    // `b` and the member's `c` went; `a` stays.
    assert_eq!(deleted, 2);
    assert!(store.upload(b.id).await.unwrap().is_none());
    assert!(store.upload(theirs.id).await.unwrap().is_none());
    assert!(store.upload(a.id).await.unwrap().is_some());
    digests.sort();
    digests.dedup();
    assert_eq!(digests, ["b".repeat(64), "c".repeat(64), "f".repeat(64)]);
    assert!(!store.blob_in_use(&"b".repeat(64)).await.unwrap());
    assert!(store.blob_in_use(&"a".repeat(64)).await.unwrap());
    assert!(
        store.blob_in_use(&"f".repeat(64)).await.unwrap(),
        "a's thumbnail"
    );
}

fn new_key(seed: u8, user_id: i64, expires_at: Option<i64>) -> crate::store::NewApiKey {
    crate::store::NewApiKey {
        token: [seed; 32],
        user_id,
        name: format!("key {seed}"),
        scopes: "messages:read messages:write".into(),
        expires_at,
    }
}

async fn bots_and_api_keys(store: &dyn Store) {
    use crate::store::TooMany;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let bot = store.create_bot(alice, "Deploy-Bot").await.unwrap();
    assert_eq!(bot.username, "deploy-bot");
    assert_eq!(bot.bot_owner, Some(alice));
    assert_eq!(
        store.user(bot.id).await.unwrap().unwrap().bot_owner,
        Some(alice)
    );
    assert_eq!(store.user(alice).await.unwrap().unwrap().bot_owner, None);
    // Bots and people share one namespace; a bot cannot log in.
    assert!(matches!(
        store.create_user("deploy-bot", "h", None).await,
        Err(StoreError::UsernameTaken)
    ));
    assert!(matches!(
        store.create_bot(bob, "Alice").await,
        Err(StoreError::UsernameTaken)
    ));
    assert!(store.credentials("deploy-bot").await.unwrap().is_none());
    assert!(matches!(
        store.create_bot(bot.id, "bot-of-a-bot").await,
        Err(StoreError::Forbidden(_))
    ));
    assert_eq!(store.bots(alice).await.unwrap(), vec![bot.clone()]);
    assert!(store.bots(bob).await.unwrap().is_empty());

    // Keys act as their holder or the holder's bots, and nobody else.
    let own = store
        .create_api_key(alice, new_key(1, alice, None))
        .await
        .unwrap();
    let for_bot = store
        .create_api_key(alice, new_key(2, bot.id, Some(10_000)))
        .await
        .unwrap();
    assert_eq!(for_bot.user_id, bot.id);
    assert_eq!(for_bot.id, crate::store::session_id(&[2; 32]));
    for (holder, acts_as) in [(bob, bot.id), (bob, alice), (alice, bob), (alice, i64::MAX)] {
        assert!(
            matches!(
                store
                    .create_api_key(holder, new_key(3, acts_as, None))
                    .await,
                Err(StoreError::NotFound)
            ),
            "{holder} as {acts_as}"
        );
    }
    let listed = store.api_keys(alice).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&own) && listed.contains(&for_bot));
    assert!(store.api_keys(bob).await.unwrap().is_empty());

    // A key finds its account until it expires.
    let found = store.key_user([2; 32], 9_999).await.unwrap().unwrap();
    assert_eq!(found.user, bot);
    assert_eq!(found.key, for_bot);
    assert!(store.key_user([2; 32], 10_000).await.unwrap().is_none());
    assert!(store.key_user([9; 32], 0).await.unwrap().is_none());
    // A session's token is not a key, nor a key's a session.
    assert!(store.session_user([1; 32], 0).await.unwrap().is_none());
    store.touch_api_key([1; 32], 5_000).await.unwrap();
    store.touch_api_key([1; 32], 4_000).await.unwrap();
    let found = store.key_user([1; 32], 0).await.unwrap().unwrap();
    assert_eq!(found.user.id, alice);
    assert_eq!(found.key.last_used_at, Some(5_000), "never moves back");

    // Only the holder deletes a key; it is gone at once.
    assert_eq!(store.delete_api_key(bob, own.id).await.unwrap(), None);
    assert_eq!(
        store.delete_api_key(alice, own.id).await.unwrap(),
        Some((alice, [1; 32]))
    );
    assert!(store.key_user([1; 32], 0).await.unwrap().is_none());
    assert_eq!(store.delete_api_key(alice, own.id).await.unwrap(), None);

    // The caps: bots per owner, keys per holder (expired ones count until deleted).
    let max_bots = crate::store::Rules::default().max_bots_per_user;
    for i in 1..max_bots {
        store
            .create_bot(bob, &format!("bob-bot-{i}"))
            .await
            .unwrap();
    }
    store.create_bot(bob, "bob-bot-last").await.unwrap();
    assert!(matches!(
        store.create_bot(bob, "bob-bot-over").await,
        Err(StoreError::TooMany(TooMany::Bots(n))) if n == max_bots
    ));
    let max_keys = crate::store::Rules::default().max_api_keys_per_user;
    for i in 0..max_keys {
        store
            .create_api_key(bob, new_key(100 + i as u8, bob, Some(1)))
            .await
            .unwrap();
    }
    assert!(matches!(
        store.create_api_key(bob, new_key(99, bob, None)).await,
        Err(StoreError::TooMany(TooMany::ApiKeys(n))) if n == max_keys
    ));
}

async fn incoming_webhooks(store: &dyn Store) {
    use crate::store::{NewIncomingWebhook, TooMany};
    let owner = user(store, "owner").await;
    let member = user(store, "member").await;
    let stranger = user(store, "stranger").await;
    let bot = store.create_bot(owner, "hook-bot").await.unwrap().id;
    let ch = store
        .create_channel(owner, ChannelKind::Group, "g", &[member])
        .await
        .unwrap()
        .id;
    let hook = |seed: u8| NewIncomingWebhook {
        token: [seed; 32],
        bot_id: bot,
        name: format!("hook {seed}"),
    };
    // The bot must be a member first.
    assert!(matches!(
        store.create_incoming_webhook(owner, ch, hook(1)).await,
        Err(StoreError::Invalid {
            field: "bot_id",
            ..
        })
    ));
    store.put_member(owner, ch, bot, None).await.unwrap();
    assert!(matches!(
        store.create_incoming_webhook(member, ch, hook(1)).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        store.create_incoming_webhook(stranger, ch, hook(1)).await,
        Err(StoreError::NotFound)
    ));
    let made = store
        .create_incoming_webhook(owner, ch, hook(1))
        .await
        .unwrap();
    assert_eq!(
        (made.channel_id, made.bot_id, made.creator_id),
        (ch, bot, owner)
    );
    assert_eq!(
        store.incoming_webhook(ch, [1; 32]).await.unwrap(),
        Some(made.clone())
    );
    assert_eq!(store.incoming_webhook(ch + 1, [1; 32]).await.unwrap(), None);
    assert_eq!(store.incoming_webhook(ch, [2; 32]).await.unwrap(), None);
    assert_eq!(
        store.incoming_webhooks(owner, ch).await.unwrap(),
        vec![made.clone()]
    );
    assert!(matches!(
        store.incoming_webhooks(member, ch).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        store.incoming_webhooks(stranger, ch).await,
        Err(StoreError::NotFound)
    ));
    // An admin manages them too; a member may not delete one.
    store
        .put_member(owner, ch, member, Some(Role::Admin))
        .await
        .unwrap();
    assert_eq!(store.incoming_webhooks(member, ch).await.unwrap().len(), 1);
    store
        .put_member(owner, ch, member, Some(Role::Member))
        .await
        .unwrap();
    assert!(matches!(
        store.delete_incoming_webhook(member, ch, made.id).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(
        store
            .delete_incoming_webhook(owner, ch, made.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .delete_incoming_webhook(owner, ch, made.id)
            .await
            .unwrap()
    );
    assert_eq!(store.incoming_webhook(ch, [1; 32]).await.unwrap(), None);
    // The cap per channel.
    let max = crate::store::Rules::default().max_webhooks_per_channel;
    for i in 0..max {
        store
            .create_incoming_webhook(owner, ch, hook(10 + i as u8))
            .await
            .unwrap();
    }
    assert!(matches!(
        store.create_incoming_webhook(owner, ch, hook(9)).await,
        Err(StoreError::TooMany(TooMany::Webhooks(n))) if n == max
    ));
}

async fn subscription_leases(store: &dyn Store) {
    use crate::store::{
        DeliveryFailure, DeliveryReport, NewSubscription, SubscriptionChange, SubscriptionStatus,
    };
    let owner = user(store, "owner").await;
    let admin = user(store, "admin").await;
    let ch = store
        .create_channel(owner, ChannelKind::Group, "g", &[admin])
        .await
        .unwrap()
        .id;
    store
        .put_member(owner, ch, admin, Some(Role::Admin))
        .await
        .unwrap();
    let new = NewSubscription {
        url: "https://example.com/hook".into(),
        secret: "whsec_x".into(),
        types: String::new(),
        cursor: 0,
    };
    let sub = store.create_subscription(admin, ch, new).await.unwrap();
    assert_eq!((sub.cursor, sub.status), (0, SubscriptionStatus::Active));
    let due = |node: &'static str, now: i64| async move {
        store
            .due_subscriptions(node, now, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(due("a", 1_000).await, vec![sub.id]);
    // One node at a time holds it; its own lease is no obstacle to itself.
    let claimed = store
        .claim_subscription(ch, sub.id, "a", 1_000, 31_000)
        .await
        .unwrap();
    assert_eq!(claimed.map(|s| s.id), Some(sub.id));
    assert!(
        store
            .claim_subscription(ch, sub.id, "b", 2_000, 32_000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(due("b", 2_000).await.is_empty());
    assert_eq!(due("a", 2_000).await, vec![sub.id]);
    let ok = |from, cursor, lease_until| DeliveryReport {
        from,
        cursor,
        delivered: cursor - from,
        failure: None,
        lease_until,
    };
    assert!(
        !store
            .record_delivery(ch, sub.id, "b", 2_000, ok(0, 9, 0))
            .await
            .unwrap()
    );
    assert!(
        store
            .record_delivery(ch, sub.id, "a", 2_000, ok(0, 5, 31_000))
            .await
            .unwrap()
    );
    // A failure counts, backs off and keeps the cursor where the run got to.
    let failed = DeliveryReport {
        failure: Some(DeliveryFailure {
            error: "the endpoint answered 503".into(),
            pause: false,
            next_try_at: 9_000,
            dead_after_ms: 60_000,
        }),
        ..ok(5, 7, 0)
    };
    assert!(
        store
            .record_delivery(ch, sub.id, "a", 3_000, failed)
            .await
            .unwrap()
    );
    let now = &store.subscriptions(owner, ch).await.unwrap()[0];
    assert_eq!((now.cursor, now.delivered, now.failures), (7, 7, 1));
    assert_eq!((now.failing_since, now.next_try_at), (Some(3_000), 9_000));
    assert!(due("b", 8_999).await.is_empty(), "backing off");
    assert_eq!(due("b", 9_000).await, vec![sub.id], "the lease was let go");
    // An admin's seek during a run wins over the run's next report, which stops it.
    store
        .claim_subscription(ch, sub.id, "b", 9_000, 39_000)
        .await
        .unwrap()
        .unwrap();
    let seek = SubscriptionChange {
        status: None,
        cursor: Some(2),
    };
    assert_eq!(
        store
            .update_subscription(owner, ch, sub.id, seek)
            .await
            .unwrap()
            .cursor,
        2
    );
    assert!(
        !store
            .record_delivery(ch, sub.id, "b", 9_500, ok(7, 12, 0))
            .await
            .unwrap()
    );
    assert_eq!(store.subscriptions(owner, ch).await.unwrap()[0].cursor, 2);
    // Paused by an admin: not due, and a run's report stops the run and keeps it paused.
    let pause = SubscriptionChange {
        status: Some(SubscriptionStatus::Paused),
        cursor: None,
    };
    store
        .claim_subscription(ch, sub.id, "b", 10_000, 40_000)
        .await
        .unwrap()
        .unwrap();
    store
        .update_subscription(admin, ch, sub.id, pause)
        .await
        .unwrap();
    assert!(
        !store
            .record_delivery(ch, sub.id, "b", 10_500, ok(2, 4, 0))
            .await
            .unwrap()
    );
    let paused = &store.subscriptions(owner, ch).await.unwrap()[0];
    assert_eq!(
        (paused.status, paused.cursor),
        (SubscriptionStatus::Paused, 4)
    );
    assert!(due("b", 50_000).await.is_empty());
    assert!(
        store
            .claim_subscription(ch, sub.id, "b", 50_000, 80_000)
            .await
            .unwrap()
            .is_none()
    );
    // Resumed: failures cleared, due at once, delivered under the resuming admin.
    let resume = SubscriptionChange {
        status: Some(SubscriptionStatus::Active),
        cursor: None,
    };
    let resumed = store
        .update_subscription(owner, ch, sub.id, resume)
        .await
        .unwrap();
    assert_eq!(
        (resumed.failures, resumed.failing_since, resumed.creator_id),
        (0, None, owner)
    );
    assert_eq!(due("c", 50_000).await, vec![sub.id]);
    // Failing past the dead-after time turns it dead.
    store
        .claim_subscription(ch, sub.id, "c", 50_000, 80_000)
        .await
        .unwrap()
        .unwrap();
    for (at, from) in [(51_000, 4), (200_000, 4)] {
        let fail = DeliveryReport {
            failure: Some(DeliveryFailure {
                error: "timed out".into(),
                pause: false,
                next_try_at: 0,
                dead_after_ms: 100_000,
            }),
            lease_until: 300_000,
            ..ok(from, from, 0)
        };
        store
            .record_delivery(ch, sub.id, "c", at, fail)
            .await
            .unwrap();
    }
    let dead = &store.subscriptions(owner, ch).await.unwrap()[0];
    assert_eq!(dead.status, SubscriptionStatus::Dead);
    // Pages of due subscriptions by id: every one is reached.
    let mut ids = Vec::new();
    for i in 0..5 {
        let new = NewSubscription {
            url: format!("https://example.com/{i}"),
            secret: "s".into(),
            types: String::new(),
            cursor: 0,
        };
        ids.push(store.create_subscription(owner, ch, new).await.unwrap().id);
    }
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let page = store.due_subscriptions("d", 1, after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        paged.extend(page.iter().map(|s| s.id));
    }
    assert_eq!(paged, ids);
    assert!(store.delete_subscription(owner, ch, sub.id).await.unwrap());
    assert!(
        !store
            .record_delivery(ch, sub.id, "c", 1, ok(4, 5, 0))
            .await
            .unwrap()
    );
}

/// The ids of `user`'s channels, as the store lists them.
async fn channel_ids(store: &dyn Store, user: i64) -> Vec<i64> {
    store
        .channels(user)
        .await
        .unwrap()
        .iter()
        .map(|v| v.channel.id)
        .collect()
}

async fn user(store: &dyn Store, name: &str) -> i64 {
    store
        .create_user(name, "hash", None)
        .await
        .expect("create user")
        .id
}

async fn users(store: &dyn Store) {
    let alice = store.create_user("Alice", "h1", None).await.unwrap();
    assert_eq!(alice.username, "alice", "stored and shown folded");
    for look_alike in ["aLICE", "ａｌｉｃｅ", "aIice", "a1ice", "al.ice"] {
        assert!(
            matches!(
                store.create_user(look_alike, "h2", None).await,
                Err(StoreError::UsernameTaken)
            ),
            "{look_alike}"
        );
    }
    assert_eq!(store.user(alice.id).await.unwrap(), Some(alice.clone()));
    assert_eq!(
        store.user_by_username("ALICE").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.user_by_username("ＡＬＩＣＥ").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.user_by_username("aiice").await.unwrap(), None);
    assert_eq!(store.user_by_username("bob").await.unwrap(), None);
    let (u, hash) = store.credentials("alice").await.unwrap().unwrap();
    assert_eq!((u.id, hash.as_str()), (alice.id, "h1"));
    let bob = store.create_user("bob", "h", None).await.unwrap();
    // An account's first session commits with it; a refused account creates no session.
    let first = new_session([9; 32], i64::MAX);
    let carol = store.create_user("carol", "h", Some(first)).await.unwrap();
    assert_eq!(
        store
            .session_user([9; 32], 0)
            .await
            .unwrap()
            .map(|s| s.user.id),
        Some(carol.id)
    );
    let second = new_session([8; 32], i64::MAX);
    assert!(matches!(
        store.create_user("CAROL", "h", Some(second)).await,
        Err(StoreError::UsernameTaken)
    ));
    assert_eq!(store.session_user([8; 32], 0).await.unwrap(), None);
    assert!(bob.id > alice.id, "snowflake ids grow");
}

fn new_session(token: crate::store::TokenHash, expires_at: i64) -> crate::store::NewSession {
    crate::store::NewSession {
        token,
        expires_at,
        address: "192.0.2.1".into(),
        agent: "conformance".into(),
    }
}

async fn sessions(store: &dyn Store) {
    let id = user(store, "sam").await;
    let live = [1u8; 32];
    let expired = [2u8; 32];
    store
        .create_session(id, new_session(live, 2_000))
        .await
        .unwrap();
    store
        .create_session(id, new_session(expired, 1_000))
        .await
        .unwrap();
    let auth = store.session_user(live, 1_500).await.unwrap().unwrap();
    assert_eq!((auth.user.id, auth.expires_at), (id, 2_000));
    assert_eq!(store.session_user(expired, 1_500).await.unwrap(), None);
    assert_eq!(store.session_user([3u8; 32], 0).await.unwrap(), None);
    // The owner's list shows unexpired sessions with where they came from, and an id
    // that is not the token.
    let listed = store.sessions(id, 1_500).await.unwrap();
    assert_eq!(listed.len(), 1);
    let s = &listed[0];
    assert_eq!(s.id, crate::store::session_id(&live));
    assert_eq!(
        (s.address.as_str(), s.agent.as_str()),
        ("192.0.2.1", "conformance")
    );
    assert_eq!(s.expires_at, 2_000);
    store
        .touch_session(live, auth.last_used_at + 5)
        .await
        .unwrap();
    let touched = store.session_user(live, 1_500).await.unwrap().unwrap();
    assert_eq!(touched.last_used_at, auth.last_used_at + 5);
    assert_eq!(
        store.purge_sessions(1_500).await.unwrap(),
        1,
        "only the expired one"
    );
    assert_eq!(
        store
            .session_user(live, 1_500)
            .await
            .unwrap()
            .map(|s| s.user.id),
        Some(id)
    );
    store.delete_session(live).await.unwrap();
    store.delete_session(live).await.unwrap();
    assert_eq!(store.session_user(live, 1_500).await.unwrap(), None);
    // By id, only the owner's; and everyone else's but one.
    let (a, b, c) = ([4u8; 32], [5u8; 32], [6u8; 32]);
    for t in [a, b, c] {
        store
            .create_session(id, new_session(t, i64::MAX))
            .await
            .unwrap();
    }
    let other = user(store, "tom").await;
    let bid = crate::store::session_id(&b);
    assert_eq!(store.delete_session_by_id(other, bid).await.unwrap(), None);
    assert_eq!(store.delete_session_by_id(id, bid).await.unwrap(), Some(b));
    assert_eq!(store.delete_session_by_id(id, bid).await.unwrap(), None);
    assert_eq!(store.delete_other_sessions(id, a).await.unwrap(), vec![c]);
    let left: Vec<i64> = store
        .sessions(id, 0)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec![crate::store::session_id(&a)]);
}

async fn channel_log_is_gap_free(store: &dyn Store) {
    let a = user(store, "ann").await;
    let b = user(store, "ben").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "general", &[b, b, a])
        .await
        .unwrap();
    assert_eq!(ch.last_seq, 2, "owner and one member added");
    for i in 0..5 {
        let who = if i % 2 == 0 { a } else { b };
        let p = store
            .post_message(who, ch.id, &format!("m{i}"), None)
            .await
            .unwrap();
        assert!(p.created);
        assert_eq!(p.message.seq, 3 + i);
    }
    let page = store.log(ch.id, 0, 200, ReadFence::PRIMARY).await.unwrap();
    let seqs: Vec<i64> = page.items.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert!(!page.has_more);
    assert!(
        matches!(page.items[0].body, EventBody::MemberAdded { user_id, role: Role::Owner } if user_id == a)
    );
    assert!(matches!(&page.items[6].body, EventBody::MessageCreated(m) if m.text == "m4"));
    let page = store.log(ch.id, 5, 1, ReadFence::PRIMARY).await.unwrap();
    assert_eq!((page.items[0].seq, page.has_more), (6, true));
    let none = store
        .log(ch.id + 1, 0, 10, ReadFence::PRIMARY)
        .await
        .unwrap();
    assert!(
        none.items.is_empty() && !none.has_more,
        "an unknown channel's log is empty"
    );
    let (seen, role) = store.channel(ch.id, b).await.unwrap().unwrap();
    assert_eq!((seen.last_seq, role), (7, Role::Member));
}

async fn client_id_is_idempotent(store: &dyn Store) {
    let a = user(store, "cid").await;
    let b = user(store, "cid2").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "g", &[b])
        .await
        .unwrap();
    let first = store
        .post_message(a, ch.id, "hello", Some("k1"))
        .await
        .unwrap();
    let again = store
        .post_message(a, ch.id, "different", Some("k1"))
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!(again.message, first.message);
    // The same client_id twice at once (one batch, most likely): created once.
    let (x, y) = tokio::join!(
        store.post_message(a, ch.id, "twice", Some("k2")),
        store.post_message(a, ch.id, "twice", Some("k2")),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.message, y.message);
    assert!(x.created && !y.created);
    // Another author may use the same client_id.
    let other = store
        .post_message(b, ch.id, "hi", Some("k1"))
        .await
        .unwrap();
    assert!(other.created);
    let page = store
        .history(ch.id, HistoryQuery::newest(50), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 3);
}

async fn broadcast_permissions(store: &dyn Store) {
    let owner = user(store, "boss").await;
    let reader = user(store, "reader").await;
    let outsider = user(store, "outsider").await;
    let ch = store
        .create_channel(owner, ChannelKind::Broadcast, "news", &[reader])
        .await
        .unwrap();
    assert!(matches!(
        store.post_message(reader, ch.id, "x", None).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        store.post_message(outsider, ch.id, "x", None).await,
        Err(StoreError::NotFound)
    ));
    store
        .post_message(owner, ch.id, "news", None)
        .await
        .unwrap();
    store
        .put_member(owner, ch.id, reader, Some(Role::Admin))
        .await
        .unwrap();
    store
        .post_message(reader, ch.id, "from admin", None)
        .await
        .unwrap();
    assert!(store.channel(ch.id, outsider).await.unwrap().is_none());
    assert!(matches!(
        store.members(outsider, ch.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store
            .log(ch.id, 0, 10, ReadFence::PRIMARY)
            .await
            .unwrap()
            .items
            .len(),
        5
    );
}

async fn member_management(store: &dyn Store) {
    let owner = user(store, "own").await;
    let m1 = user(store, "mem1").await;
    let m2 = user(store, "mem2").await;
    let ch = store
        .create_channel(owner, ChannelKind::Group, "team", &[])
        .await
        .unwrap();
    assert!(matches!(
        store.put_member(m1, ch.id, m2, None).await,
        Err(StoreError::NotFound)
    ));
    store.put_member(owner, ch.id, m1, None).await.unwrap();
    assert!(matches!(
        store.put_member(m1, ch.id, m2, None).await,
        Err(StoreError::Forbidden(_))
    ));
    store
        .put_member(owner, ch.id, m1, Some(Role::Admin))
        .await
        .unwrap();
    store.put_member(m1, ch.id, m2, None).await.unwrap();
    assert!(matches!(
        store.put_member(owner, ch.id, 424242, None).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.put_member(m1, ch.id, owner, Some(Role::Member)).await,
        Err(StoreError::Forbidden(_))
    ));
    let roles: Vec<(i64, Role)> = store
        .members(owner, ch.id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user.id, m.role))
        .collect();
    assert_eq!(
        roles,
        vec![(owner, Role::Owner), (m1, Role::Admin), (m2, Role::Member)]
    );
    assert!(matches!(
        store.remove_member(m2, ch.id, m1).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        store.remove_member(owner, ch.id, owner).await,
        Err(StoreError::Forbidden(_))
    ));
    store.remove_member(m1, ch.id, m2).await.unwrap();
    store.remove_member(m1, ch.id, m1).await.unwrap();
    assert!(store.channel(ch.id, m1).await.unwrap().is_none());
    let kinds: Vec<&str> = store
        .log(ch.id, 0, 200, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| e.body.kind())
        .collect();
    assert_eq!(
        kinds,
        [
            "member.added",
            "member.added",
            "member.updated",
            "member.added",
            "member.removed",
            "member.removed"
        ]
    );
    let renamed = store.rename_channel(owner, ch.id, "renamed").await.unwrap();
    assert_eq!(renamed.name.as_deref(), Some("renamed"));
    assert_eq!(renamed.last_seq, 7);
}

async fn unread_counts(store: &dyn Store) {
    let a = user(store, "ua").await;
    let b = user(store, "ub").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "u", &[b])
        .await
        .unwrap();
    let unread = |views: Vec<crate::model::ChannelView>| {
        views
            .iter()
            .find(|v| v.channel.id == ch.id)
            .map(|v| (v.read_seq, v.unread))
            .unwrap()
    };
    let m1 = store
        .post_message(a, ch.id, "1", None)
        .await
        .unwrap()
        .message;
    let m2 = store
        .post_message(a, ch.id, "2", None)
        .await
        .unwrap()
        .message;
    store.post_message(b, ch.id, "own", None).await.unwrap();
    let m4 = store
        .post_message(a, ch.id, "4", None)
        .await
        .unwrap()
        .message;
    assert_eq!(
        unread(store.channels(b).await.unwrap()),
        (2, 3),
        "three of a's messages"
    );
    assert_eq!(
        unread(store.channels(a).await.unwrap()).1,
        1,
        "b's one message"
    );
    store.mark_read(b, ch.id, m1.seq).await.unwrap();
    assert_eq!(unread(store.channels(b).await.unwrap()), (m1.seq, 2));
    store.mark_read(b, ch.id, 1).await.unwrap();
    assert_eq!(
        unread(store.channels(b).await.unwrap()),
        (m1.seq, 2),
        "never backwards"
    );
    store.delete_message(a, ch.id, m2.id).await.unwrap();
    assert_eq!(
        unread(store.channels(b).await.unwrap()).1,
        1,
        "deleted messages are not unread"
    );
    store.delete_message(a, ch.id, m1.id).await.unwrap();
    assert_eq!(
        unread(store.channels(b).await.unwrap()).1,
        1,
        "a deleted read message changes nothing"
    );
    store.mark_read(b, ch.id, i64::MAX).await.unwrap();
    let last = store.channel(ch.id, b).await.unwrap().unwrap().0.last_seq;
    assert_eq!(last, m4.seq + 2, "two deletions appended two events");
    assert_eq!(
        unread(store.channels(b).await.unwrap()),
        (last, 0),
        "clamped to last seq"
    );
    assert!(matches!(
        store.mark_read(424242, ch.id, 1).await,
        Err(StoreError::NotFound)
    ));
}

async fn history_pages(store: &dyn Store) {
    let a = user(store, "hist").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "h", &[])
        .await
        .unwrap();
    let mut seqs = Vec::new();
    for i in 0..7 {
        seqs.push(
            store
                .post_message(a, ch.id, &format!("{i}"), None)
                .await
                .unwrap()
                .message
                .seq,
        );
    }
    let q = |before_seq, after_seq, limit| HistoryQuery {
        before_seq,
        after_seq,
        limit,
    };
    let newest = store
        .history(ch.id, q(None, None, 3), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(
        newest.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        seqs[4..]
    );
    assert!(newest.has_more);
    let older = store
        .history(ch.id, q(Some(seqs[4]), None, 10), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(
        older.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        seqs[..4]
    );
    assert!(!older.has_more);
    let forward = store
        .history(ch.id, q(None, Some(seqs[1]), 2), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(
        forward.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        seqs[2..4]
    );
    assert!(forward.has_more);
    let window = store
        .history(
            ch.id,
            q(Some(seqs[5]), Some(seqs[1]), 10),
            ReadFence::PRIMARY,
        )
        .await
        .unwrap();
    assert_eq!(
        window.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
        seqs[2..5]
    );
    assert!(!window.has_more);
}

async fn dm_is_one_per_pair(store: &dyn Store) {
    let a = user(store, "dma").await;
    let b = user(store, "dmb").await;
    let (first, created) = store.open_dm(a, b).await.unwrap();
    assert!(created);
    assert_eq!((first.kind, first.name.clone()), (ChannelKind::Dm, None));
    let (again, created) = store.open_dm(b, a).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    assert!(matches!(
        store.open_dm(a, a).await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.open_dm(a, 424242).await,
        Err(StoreError::NotFound)
    ));
    let c = user(store, "dmc").await;
    assert!(matches!(
        store.put_member(a, first.id, c, None).await,
        Err(StoreError::Forbidden(_))
    ));
    store.post_message(b, first.id, "hi", None).await.unwrap();
}

async fn delete_redacts(store: &dyn Store) {
    let a = user(store, "del").await;
    let b = user(store, "del2").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "d", &[b])
        .await
        .unwrap();
    let m = store
        .post_message(b, ch.id, "secret", None)
        .await
        .unwrap()
        .message;
    let edited = store
        .edit_message(b, ch.id, m.id, "secret v2")
        .await
        .unwrap();
    assert_eq!(
        (edited.text.as_str(), edited.edited_at.is_some()),
        ("secret v2", true)
    );
    assert!(matches!(
        store.edit_message(a, ch.id, m.id, "x").await,
        Err(StoreError::Forbidden(_))
    ));
    store.delete_message(a, ch.id, m.id).await.unwrap(); // owner may delete
    store.delete_message(b, ch.id, m.id).await.unwrap(); // again: no-op
    assert!(matches!(
        store.edit_message(b, ch.id, m.id, "x").await,
        Err(StoreError::NotFound)
    ));
    let page = store
        .history(ch.id, HistoryQuery::newest(10), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(
        (page.items[0].deleted, page.items[0].text.as_str()),
        (true, "")
    );
    let events = store
        .log(ch.id, 0, 200, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    let kinds: Vec<&str> = events.iter().map(|e| e.body.kind()).collect();
    assert_eq!(
        &kinds[2..],
        ["message.created", "message.edited", "message.deleted"]
    );
    for e in &events[2..] {
        match &e.body {
            EventBody::MessageCreated(m)
            | EventBody::MessageEdited(m)
            | EventBody::MessageDeleted(m) => {
                assert!(m.deleted && m.text.is_empty(), "redacted in {e:?}")
            }
            _ => unreachable!(),
        }
    }
    assert!(matches!(
        store.delete_message(a, ch.id, 1).await,
        Err(StoreError::NotFound)
    ));
}

/// `(emoji, count, me)` of each of a message's reactions, as `viewer` sees them.
async fn reaction_view(
    store: &dyn Store,
    viewer: i64,
    channel: i64,
    message: i64,
) -> Vec<(String, i64, bool)> {
    store
        .reactions(viewer, channel, &[message])
        .await
        .unwrap()
        .into_iter()
        .flat_map(|(id, list)| {
            assert_eq!(id, message);
            list
        })
        .map(|r| (r.emoji, r.count, r.me))
        .collect()
}

async fn reactions(store: &dyn Store) {
    let a = user(store, "rea").await;
    let b = user(store, "reb").await;
    let outsider = user(store, "rec").await;
    // A broadcast channel: plain members cannot post, but may react.
    let ch = store
        .create_channel(a, ChannelKind::Broadcast, "r", &[b])
        .await
        .unwrap();
    let m = store
        .post_message(a, ch.id, "react to me", None)
        .await
        .unwrap()
        .message;
    let after_post = store.channel(ch.id, a).await.unwrap().unwrap().0.last_seq;
    assert!(store.react(b, ch.id, m.id, "👍", true).await.unwrap());
    assert!(
        !store.react(b, ch.id, m.id, "👍", true).await.unwrap(),
        "the same reaction twice is one"
    );
    assert!(store.react(a, ch.id, m.id, "❤️", true).await.unwrap());
    assert!(store.react(a, ch.id, m.id, "👍", true).await.unwrap());
    assert_eq!(
        reaction_view(store, b, ch.id, m.id).await,
        [("👍".into(), 2, true), ("❤️".into(), 1, false)],
        "counts, the viewer's own, and emoji in the order first used"
    );
    assert_eq!(
        reaction_view(store, a, ch.id, m.id).await,
        [("👍".into(), 2, true), ("❤️".into(), 1, true)]
    );
    // Non-members and messages of other channels are not found.
    assert!(matches!(
        store.react(outsider, ch.id, m.id, "👍", true).await,
        Err(StoreError::NotFound)
    ));
    let other = store
        .create_channel(outsider, ChannelKind::Group, "o", &[])
        .await
        .unwrap();
    assert!(matches!(
        store.react(outsider, other.id, m.id, "👍", true).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        store
            .reactions(outsider, other.id, &[m.id])
            .await
            .unwrap()
            .is_empty(),
        "a message of another channel shows nothing"
    );
    // Who reacted, in order, in pages.
    let first = store.reactors(ch.id, m.id, "👍", None, 1).await.unwrap();
    assert_eq!(
        (first.items.len(), first.items[0].user.id, first.has_more),
        (1, b, true)
    );
    let last = &first.items[0];
    let rest = store
        .reactors(ch.id, m.id, "👍", Some(last.seq), 5)
        .await
        .unwrap();
    let ids: Vec<i64> = rest.items.iter().map(|r| r.user.id).collect();
    assert_eq!((ids, rest.has_more), (vec![a], false));
    // Taking back: once changes, twice does nothing.
    assert!(store.react(b, ch.id, m.id, "👍", false).await.unwrap());
    assert!(!store.react(b, ch.id, m.id, "👍", false).await.unwrap());
    assert!(!store.react(b, ch.id, m.id, "🎉", false).await.unwrap());
    assert!(store.react(a, ch.id, m.id, "👍", false).await.unwrap());
    assert_eq!(
        reaction_view(store, a, ch.id, m.id).await,
        [("❤️".into(), 1, true)],
        "an emoji nobody holds any more is gone"
    );
    // Each change is one event, in order, after the post's.
    let events = store
        .log(ch.id, after_post, 200, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    let seen: Vec<(&str, i64, &str)> = events
        .iter()
        .map(|e| match &e.body {
            EventBody::ReactionAdded {
                message_id,
                user_id,
                emoji,
            }
            | EventBody::ReactionRemoved {
                message_id,
                user_id,
                emoji,
            } => {
                assert_eq!(*message_id, m.id);
                (e.body.kind(), *user_id, emoji.as_str())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("reaction.added", b, "👍"),
            ("reaction.added", a, "❤️"),
            ("reaction.added", a, "👍"),
            ("reaction.removed", b, "👍"),
            ("reaction.removed", a, "👍"),
        ]
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (after_post + 1..=after_post + 5).collect::<Vec<_>>());
}

async fn reaction_limits_and_deletes(store: &dyn Store) {
    let a = user(store, "rla").await;
    let b = user(store, "rlb").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "rl", &[b])
        .await
        .unwrap();
    let m = store
        .post_message(b, ch.id, "popular", None)
        .await
        .unwrap()
        .message;
    let max = crate::store::Rules::default().max_reactions_per_message as usize;
    let emoji: Vec<&str> = emojis::iter().take(max + 1).map(|e| e.as_str()).collect();
    for e in &emoji[..max] {
        assert!(store.react(a, ch.id, m.id, e, true).await.unwrap());
    }
    assert!(matches!(
        store.react(b, ch.id, m.id, emoji[max], true).await,
        Err(StoreError::TooMany(crate::store::TooMany::Reactions(n))) if n as usize == max
    ));
    // An emoji the message already has still takes more users; taking back passes.
    assert!(store.react(b, ch.id, m.id, emoji[0], true).await.unwrap());
    assert!(store.react(a, ch.id, m.id, emoji[1], false).await.unwrap());
    assert!(store.react(b, ch.id, m.id, emoji[max], true).await.unwrap());
    let view = reaction_view(store, b, ch.id, m.id).await;
    assert_eq!(view.len(), max);
    assert_eq!(view[0], (emoji[0].to_owned(), 2, true));
    assert_eq!(view[max - 1], (emoji[max].to_owned(), 1, true));
    // A deleted message takes its reactions along and takes no more; its reaction
    // events stay readable in the log.
    let before_delete = store.channel(ch.id, a).await.unwrap().unwrap().0.last_seq;
    store.delete_message(b, ch.id, m.id).await.unwrap();
    assert!(reaction_view(store, a, ch.id, m.id).await.is_empty());
    assert!(
        store
            .reactors(ch.id, m.id, emoji[0], None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(matches!(
        store.react(a, ch.id, m.id, emoji[0], true).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.react(a, ch.id, m.id, emoji[0], false).await,
        Err(StoreError::NotFound)
    ));
    let events = store
        .log(ch.id, 0, 200, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    let reacted: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ReactionAdded { emoji, .. } => Some(emoji.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(reacted.len(), max + 2, "every addition is in the log");
    assert!(reacted.iter().all(|e| !e.is_empty()), "deleting kept them");
    assert_eq!(
        events.last().map(|e| (e.seq, e.body.kind())),
        Some((before_delete + 1, "message.deleted"))
    );
}

async fn threads(store: &dyn Store) {
    let a = user(store, "tha").await;
    let b = user(store, "thb").await;
    let outsider = user(store, "thc").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "t", &[b])
        .await
        .unwrap();
    let other = store
        .create_channel(outsider, ChannelKind::Group, "o", &[])
        .await
        .unwrap();
    let root = store
        .post_message(a, ch.id, "root", None)
        .await
        .unwrap()
        .message;
    // A post is found by id at once (on SQLite, while still in the commit log).
    assert_eq!(
        store.message(ch.id, root.id).await.unwrap().map(|m| m.text),
        Some("root".into())
    );
    assert_eq!(store.message(other.id, root.id).await.unwrap(), None);
    let r1 = store
        .post_reply(b, ch.id, root.id, "r1", Some("c-1"))
        .await
        .unwrap();
    assert!(r1.created);
    assert_eq!(r1.message.thread_root_id, Some(root.id));
    let again = store
        .post_reply(b, ch.id, root.id, "r1 again", Some("c-1"))
        .await
        .unwrap();
    assert_eq!((again.created, again.message), (false, r1.message.clone()));
    let r2 = store
        .post_reply(a, ch.id, root.id, "r2", None)
        .await
        .unwrap()
        .message;
    let now = store.message(ch.id, root.id).await.unwrap().unwrap();
    assert_eq!(
        (now.reply_count, now.last_reply_at),
        (2, Some(r2.created_at))
    );
    // Refusals: a reply as root, a root of another channel, a non-member, no such root.
    assert!(matches!(
        store.post_reply(a, ch.id, r1.message.id, "x", None).await,
        Err(StoreError::Invalid {
            field: "thread_root_id",
            ..
        })
    ));
    // A root the channel does not have (none, or another channel's) is the body's fault.
    for (who, channel, root_id) in [(a, ch.id, 999_999), (outsider, other.id, root.id)] {
        assert!(
            matches!(
                store.post_reply(who, channel, root_id, "x", None).await,
                Err(StoreError::Invalid {
                    field: "thread_root_id",
                    ..
                })
            ),
            "{who} in {channel} to {root_id}"
        );
    }
    assert!(matches!(
        store.post_reply(outsider, ch.id, root.id, "x", None).await,
        Err(StoreError::NotFound)
    ));
    // The thread, paged both ways; the channel's history and log show the replies, marked.
    let thread = store
        .thread(ch.id, root.id, HistoryQuery::newest(10))
        .await
        .unwrap();
    let ids: Vec<i64> = thread.items.iter().map(|m| m.id).collect();
    assert_eq!((ids, thread.has_more), (vec![r1.message.id, r2.id], false));
    let newest = store
        .thread(ch.id, root.id, HistoryQuery::newest(1))
        .await
        .unwrap();
    assert_eq!((newest.items[0].id, newest.has_more), (r2.id, true));
    let older = HistoryQuery {
        before_seq: Some(r2.seq),
        ..HistoryQuery::newest(1)
    };
    let older = store.thread(ch.id, root.id, older).await.unwrap();
    assert_eq!((older.items[0].id, older.has_more), (r1.message.id, false));
    let forward = HistoryQuery {
        after_seq: Some(0),
        ..HistoryQuery::newest(1)
    };
    let forward = store.thread(ch.id, root.id, forward).await.unwrap();
    assert_eq!(
        (forward.items[0].id, forward.has_more),
        (r1.message.id, true)
    );
    assert!(
        store
            .thread(other.id, root.id, HistoryQuery::newest(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let history = store
        .history(ch.id, HistoryQuery::newest(10), ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    let marked: Vec<Option<i64>> = history.iter().map(|m| m.thread_root_id).collect();
    assert_eq!(marked, [None, Some(root.id), Some(root.id)]);
    let log = store
        .log(ch.id, root.seq, 10, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    assert!(log.iter().all(|e| matches!(&e.body,
        EventBody::MessageCreated(m) if m.thread_root_id == Some(root.id))));
    // Replies count as unread, as any message.
    let unread = store.channels(b).await.unwrap()[0].unread;
    assert_eq!(unread, 2, "the root and a's reply");
    // A deleted reply leaves the count; a deleted root leaves its thread readable, and
    // open while it has replies.
    store.delete_message(b, ch.id, r1.message.id).await.unwrap();
    let now = store.message(ch.id, root.id).await.unwrap().unwrap();
    assert_eq!(now.reply_count, 1);
    store.delete_message(a, ch.id, root.id).await.unwrap();
    let thread = store
        .thread(ch.id, root.id, HistoryQuery::newest(10))
        .await
        .unwrap()
        .items;
    assert_eq!(
        thread.iter().map(|m| (m.id, m.deleted)).collect::<Vec<_>>(),
        [(r1.message.id, true), (r2.id, false)]
    );
    store
        .post_reply(b, ch.id, root.id, "still here", None)
        .await
        .unwrap();
    let lonely = store
        .post_message(a, ch.id, "nobody answers", None)
        .await
        .unwrap()
        .message;
    store.delete_message(a, ch.id, lonely.id).await.unwrap();
    assert!(matches!(
        store.post_reply(b, ch.id, lonely.id, "x", None).await,
        Err(StoreError::Invalid {
            field: "thread_root_id",
            ..
        })
    ));
    // In a broadcast channel replies follow the posting rule.
    let news = store
        .create_channel(a, ChannelKind::Broadcast, "n", &[b])
        .await
        .unwrap();
    let post = store
        .post_message(a, news.id, "news", None)
        .await
        .unwrap()
        .message;
    assert!(matches!(
        store.post_reply(b, news.id, post.id, "x", None).await,
        Err(StoreError::Forbidden(_))
    ));
}

/// `user`'s unread and unread mentions in the channel.
async fn counts(store: &dyn Store, user: i64, channel: i64) -> (i64, i64) {
    let views = store.channels(user).await.unwrap();
    let v = views.iter().find(|v| v.channel.id == channel).unwrap();
    (v.unread, v.mentions)
}

async fn mentions(store: &dyn Store) {
    let a = user(store, "mena").await;
    let b = user(store, "menb").await;
    let c = user(store, "menc").await;
    let _outsider = user(store, "mend").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "m", &[b, c])
        .await
        .unwrap();
    let first = store
        .post_message(
            a,
            ch.id,
            "hi @MENB, @mend (not here), @nobody and @mena",
            None,
        )
        .await
        .unwrap()
        .message;
    assert_eq!(
        first.mentions,
        [b, a],
        "members only, in order, the author too"
    );
    assert_eq!(counts(store, b, ch.id).await, (1, 1));
    assert_eq!(counts(store, c, ch.id).await, (1, 0));
    assert_eq!(
        counts(store, a, ch.id).await,
        (0, 0),
        "one's own mention counts not"
    );
    let plain = store
        .post_message(a, ch.id, "mail me at x@menb.example", None)
        .await
        .unwrap()
        .message;
    assert!(plain.mentions.is_empty());
    // The read marker clears them.
    store.mark_read(b, ch.id, first.seq).await.unwrap();
    assert_eq!(counts(store, b, ch.id).await, (1, 0));
    // Edits move mentions; a delete takes them back.
    let second = store
        .post_message(a, ch.id, "@menb again", Some("m-2"))
        .await
        .unwrap()
        .message;
    assert_eq!(counts(store, b, ch.id).await, (2, 1));
    let edited = store
        .edit_message(a, ch.id, second.id, "now for @menc")
        .await
        .unwrap();
    assert_eq!(edited.mentions, [c]);
    assert_eq!(counts(store, b, ch.id).await, (2, 0));
    assert_eq!(counts(store, c, ch.id).await, (3, 1));
    // A retry answers the original, and counts nothing twice.
    let retry = store
        .post_message(a, ch.id, "@menb again", Some("m-2"))
        .await
        .unwrap();
    assert!(!retry.created);
    assert_eq!(counts(store, c, ch.id).await, (3, 1));
    let reply = store
        .post_reply(b, ch.id, first.id, "@menc look", None)
        .await
        .unwrap()
        .message;
    assert_eq!(reply.mentions, [c]);
    assert_eq!(counts(store, c, ch.id).await, (4, 2));
    store.delete_message(a, ch.id, second.id).await.unwrap();
    assert_eq!(counts(store, c, ch.id).await, (3, 1));
    // The log and history carry them; a deleted message shows none.
    let history = store
        .history(ch.id, HistoryQuery::newest(10), ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    let shown: Vec<(bool, Vec<i64>)> = history
        .iter()
        .map(|m| (m.deleted, m.mentions.clone()))
        .collect();
    assert_eq!(
        shown,
        [
            (false, vec![b, a]),
            (false, vec![]),
            (true, vec![]),
            (false, vec![c])
        ]
    );
    let log = store
        .log(ch.id, 0, 50, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items;
    assert!(log.iter().any(|e| matches!(&e.body,
        EventBody::MessageCreated(m) if m.id == first.id && m.mentions == [b, a])));
    // Each user's recent mentions, newest first, paged; not in channels they left.
    let list = store.mentions(c, None, 10).await.unwrap();
    assert_eq!(
        (
            list.items.iter().map(|m| m.id).collect::<Vec<_>>(),
            list.has_more
        ),
        (vec![reply.id], false)
    );
    for i in 0..3 {
        store
            .post_message(c, ch.id, &format!("@menb {i}"), None)
            .await
            .unwrap();
    }
    let page = store.mentions(b, None, 2).await.unwrap();
    let texts: Vec<&str> = page.items.iter().map(|m| m.text.as_str()).collect();
    assert_eq!((texts, page.has_more), (vec!["@menb 2", "@menb 1"], true));
    let last = page.items.last().unwrap().id;
    let rest = store.mentions(b, Some(last), 10).await.unwrap();
    let ids: Vec<i64> = rest.items.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 2, "@menb 0 and the first message");
    assert_eq!(*ids.last().unwrap(), first.id);
    store.remove_member(b, ch.id, b).await.unwrap();
    assert!(store.mentions(b, None, 10).await.unwrap().items.is_empty());
}

async fn profiles(store: &dyn Store) {
    use crate::model::ProfileChange;
    let a = user(store, "profa").await;
    let b = user(store, "profb").await;
    let fresh = store.user(a).await.unwrap().unwrap();
    assert_eq!((fresh.display_name, fresh.about), (None, None));
    let set = |d: Option<Option<&str>>, ab: Option<Option<&str>>| ProfileChange {
        display_name: d.map(|v| v.map(str::to_owned)),
        about: ab.map(|v| v.map(str::to_owned)),
    };
    let changed = store
        .update_profile(a, set(Some(Some("Ada L.")), Some(Some("Counts.\nMostly."))))
        .await
        .unwrap();
    assert_eq!(
        (changed.display_name.as_deref(), changed.about.as_deref()),
        (Some("Ada L."), Some("Counts.\nMostly."))
    );
    // A field left out stays; a cleared one goes.
    let kept = store
        .update_profile(a, set(None, Some(None)))
        .await
        .unwrap();
    assert_eq!(
        (kept.display_name.as_deref(), kept.about.as_deref()),
        (Some("Ada L."), None)
    );
    // Every read of the user carries it: by id, by name, as a member, at login.
    assert_eq!(store.user(a).await.unwrap().unwrap(), kept);
    assert_eq!(
        store.user_by_username("PROFA").await.unwrap().unwrap(),
        kept
    );
    assert_eq!(store.credentials("profa").await.unwrap().unwrap().0, kept);
    let ch = store
        .create_channel(a, ChannelKind::Group, "p", &[b])
        .await
        .unwrap();
    let members = store.members(b, ch.id).await.unwrap();
    let shown = members.iter().find(|m| m.user.id == a).unwrap();
    assert_eq!(shown.user, kept);
    assert!(matches!(
        store.update_profile(999_999, set(Some(None), None)).await,
        Err(StoreError::NotFound)
    ));
}

/// The texts `user` finds for `q` (in `channel`, or all theirs), newest first.
async fn found(store: &dyn Store, user: i64, q: &str, channel: Option<i64>) -> Vec<String> {
    let query = crate::store::SearchQuery {
        query: crate::search::Query::parse(q).unwrap(),
        channel_id: channel,
        order: crate::store::SearchOrder::Newest,
        from: None,
        limit: 50,
    };
    let page = store.search(user, &query).await.unwrap();
    assert!(!page.has_more);
    page.items.into_iter().map(|m| m.text).collect()
}

async fn search(store: &dyn Store) {
    use crate::store::{SearchOrder, SearchQuery};
    let a = user(store, "seara").await;
    let b = user(store, "searb").await;
    let c = user(store, "searc").await;
    let ab = store
        .create_channel(a, ChannelKind::Group, "ab", &[b])
        .await
        .unwrap()
        .id;
    let ac = store
        .create_channel(a, ChannelKind::Group, "ac", &[c])
        .await
        .unwrap()
        .id;
    let bc = store
        .create_channel(b, ChannelKind::Group, "bc", &[c])
        .await
        .unwrap()
        .id;
    let post = |ch: i64, by: i64, text: &'static str| async move {
        store
            .post_message(by, ch, text, None)
            .await
            .unwrap()
            .message
    };
    post(ab, a, "the quick brown fox").await;
    let lazy = post(ab, b, "a lazy dog sleeps").await;
    let thinking = post(ab, a, "Quick thinking, @searb!").await;
    post(ac, c, "quick secret plan").await;
    post(bc, c, "quick other talk").await;

    // Only the caller's channels, newest first, whatever the case; found at once after
    // the send (on SQLite, from the commit log before its fold).
    assert_eq!(
        found(store, a, "QUICK", None).await,
        [
            "quick secret plan",
            "Quick thinking, @searb!",
            "the quick brown fox"
        ]
    );
    assert_eq!(
        found(store, b, "quick", None).await,
        [
            "quick other talk",
            "Quick thinking, @searb!",
            "the quick brown fox"
        ]
    );
    assert_eq!(found(store, b, "secret", None).await, Vec::<String>::new());
    assert_eq!(
        found(store, a, "quick", Some(ac)).await,
        ["quick secret plan"]
    );
    let theirs = SearchQuery {
        query: crate::search::Query::parse("secret").unwrap(),
        channel_id: Some(ac),
        order: SearchOrder::Newest,
        from: None,
        limit: 10,
    };
    assert!(matches!(
        store.search(b, &theirs).await,
        Err(StoreError::NotFound)
    ));

    // Phrases, prefixes, exclusions.
    assert_eq!(
        found(store, a, "\"brown fox\"", None).await,
        ["the quick brown fox"]
    );
    assert!(found(store, a, "\"fox brown\"", None).await.is_empty());
    assert_eq!(
        found(store, a, "thin*", None).await,
        ["Quick thinking, @searb!"]
    );
    assert_eq!(
        found(store, a, "quick -fox -\"secret plan\"", None).await,
        ["Quick thinking, @searb!"]
    );
    assert_eq!(
        found(store, b, "searb", None).await,
        ["Quick thinking, @searb!"]
    );

    // An edit is found by its new text only; a deleted message not at all.
    store
        .edit_message(b, ab, lazy.id, "an energetic dog runs")
        .await
        .unwrap();
    assert!(found(store, a, "lazy", None).await.is_empty());
    assert_eq!(
        found(store, a, "energetic", None).await,
        ["an energetic dog runs"]
    );
    store.delete_message(a, ab, thinking.id).await.unwrap();
    assert!(found(store, a, "thinking", None).await.is_empty());

    // Pages, newest first and best first.
    for i in 0..5 {
        post(
            ac,
            a,
            [
                "page one",
                "page page",
                "page page page",
                "page two",
                "page",
            ][i],
        )
        .await;
    }
    let mut query = SearchQuery {
        query: crate::search::Query::parse("page").unwrap(),
        channel_id: None,
        order: SearchOrder::Newest,
        from: None,
        limit: 2,
    };
    let mut seen = Vec::new();
    loop {
        let page = store.search(a, &query).await.unwrap();
        seen.extend(page.items.iter().map(|m| m.text.clone()));
        if !page.has_more {
            break;
        }
        query.from = Some(page.items.last().unwrap().id);
    }
    assert_eq!(
        seen,
        [
            "page",
            "page two",
            "page page page",
            "page page",
            "page one"
        ]
    );
    query.order = SearchOrder::Relevance;
    query.from = None;
    let best = store.search(a, &query).await.unwrap();
    assert!(best.has_more);
    assert_eq!(
        best.items[0].text, "page page page",
        "most occurrences first"
    );
    let mut all = best.items.clone();
    query.from = Some(2);
    query.limit = 10;
    let rest = store.search(a, &query).await.unwrap();
    assert!(!rest.has_more);
    all.extend(rest.items);
    let mut texts: Vec<String> = all.into_iter().map(|m| m.text).collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            "page",
            "page one",
            "page page",
            "page page page",
            "page two"
        ]
    );

    // Text each index splits its own way is found by the same query on both.
    post(ab, a, "send an e-mail to ops.example.com now").await;
    for q in ["e-mail", "\"an e-mail\"", "ops.example.com", "e-mai*"] {
        assert_eq!(
            found(store, b, q, None).await,
            ["send an e-mail to ops.example.com now"],
            "{q}"
        );
    }
    // A positive part the index finds no word in finds nothing, not everything else.
    assert!(found(store, b, "² -spam", None).await.is_empty());

    // A member who leaves no longer finds the channel's messages.
    store.remove_member(b, ab, b).await.unwrap();
    assert_eq!(found(store, b, "quick", None).await, ["quick other talk"]);
}

async fn edits_keep_each_version_in_the_log(store: &dyn Store) {
    let a = user(store, "editor").await;
    let ch = store
        .create_channel(a, ChannelKind::Group, "e", &[])
        .await
        .unwrap();
    let m = store
        .post_message(a, ch.id, "v1", None)
        .await
        .unwrap()
        .message;
    store.post_message(a, ch.id, "other", None).await.unwrap();
    store.edit_message(a, ch.id, m.id, "v2").await.unwrap();
    store.edit_message(a, ch.id, m.id, "v3").await.unwrap();
    let texts: Vec<(String, Option<i64>)> = store
        .log(ch.id, 0, 200, ReadFence::PRIMARY)
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::MessageCreated(x) | EventBody::MessageEdited(x) if x.id == m.id => {
                Some((x.text.clone(), x.edited_at))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        texts.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        ["v1", "v2", "v3"]
    );
    assert!(texts[0].1.is_none() && texts[1].1.is_some());
    let latest = store
        .history(ch.id, HistoryQuery::newest(10), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(latest.items[0].text, "v3");
}

/// Checks over two store values on the same data, standing for two nodes of a cluster
/// (a backend that one process alone may open, like SQLite, has none to pass).
pub const TWO_NODE_CHECKS: &[&str] = &[
    "two_writers_keep_seqs_gap_free",
    "a_retry_through_the_other_node_returns_the_original",
    "each_node_sees_the_others_writes",
    "both_nodes_opening_one_dm_get_the_same_dm",
    "the_channel_index_follows_changes_made_through_both_nodes",
];

/// Runs the two-node check called `name` against `a` and `b`.
pub async fn run_two(name: &str, a: &dyn Store, b: &dyn Store) {
    match name {
        "two_writers_keep_seqs_gap_free" => two_writers_keep_seqs_gap_free(a, b).await,
        "a_retry_through_the_other_node_returns_the_original" => {
            a_retry_through_the_other_node_returns_the_original(a, b).await
        }
        "each_node_sees_the_others_writes" => each_node_sees_the_others_writes(a, b).await,
        "both_nodes_opening_one_dm_get_the_same_dm" => {
            both_nodes_opening_one_dm_get_the_same_dm(a, b).await
        }
        "the_channel_index_follows_changes_made_through_both_nodes" => {
            the_channel_index_follows_changes_made_through_both_nodes(a, b).await
        }
        other => panic!("no two-node check {other}"),
    }
}

/// `n` sends by `who`, round-robin over `channels`, made in order and awaited together.
async fn send_many(
    store: &dyn Store,
    who: i64,
    channels: &[i64],
    n: usize,
) -> Vec<crate::store::Result<crate::store::Posted>> {
    let futures: Vec<_> = (0..n)
        .map(|i| store.post_message(who, channels[i % channels.len()], "m", None))
        .collect();
    futures_util::future::join_all(futures).await
}

/// Both nodes send to the same channels at once: every send is in the log once, each
/// channel's seqs are 1..=n, and each node's own sends keep their order.
async fn two_writers_keep_seqs_gap_free(a: &dyn Store, b: &dyn Store) {
    let ann = user(a, "ann").await;
    let bob = user(b, "bob").await;
    let mut channels = Vec::new();
    for i in 0..4 {
        channels.push(
            a.create_channel(ann, ChannelKind::Group, &format!("c{i}"), &[bob])
                .await
                .unwrap()
                .id,
        );
    }
    const EACH: usize = 160;
    let (from_a, from_b) = tokio::join!(
        send_many(a, ann, &channels, EACH),
        send_many(b, bob, &channels, EACH)
    );
    for r in from_a.iter().chain(&from_b) {
        assert!(r.as_ref().unwrap().created);
    }
    for &ch in &channels {
        let log = a.log(ch, 0, 1000, ReadFence::PRIMARY).await.unwrap();
        let seqs: Vec<i64> = log.items.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "channel {ch}"
        );
        let messages = log
            .items
            .iter()
            .filter(|e| matches!(e.body, EventBody::MessageCreated(_)))
            .count();
        assert_eq!(messages, EACH * 2 / channels.len(), "channel {ch}");
        let (seen, _) = b.channel(ch, bob).await.unwrap().unwrap();
        assert_eq!(seen.last_seq, seqs.len() as i64);
    }
    // Each node's sends to a channel commit in the order they were made.
    for (results, _) in [(&from_a, "a"), (&from_b, "b")] {
        let mut last: std::collections::HashMap<i64, i64> = Default::default();
        for p in results.iter().map(|r| &r.as_ref().unwrap().message) {
            let before = last.insert(p.channel_id, p.seq).unwrap_or(0);
            assert!(
                p.seq > before,
                "sends of one node reordered in {}",
                p.channel_id
            );
        }
    }
}

async fn a_retry_through_the_other_node_returns_the_original(a: &dyn Store, b: &dyn Store) {
    let ann = user(a, "ann").await;
    let ch = a
        .create_channel(ann, ChannelKind::Group, "g", &[])
        .await
        .unwrap();
    let first = a
        .post_message(ann, ch.id, "hello", Some("k1"))
        .await
        .unwrap();
    let again = b
        .post_message(ann, ch.id, "hello again", Some("k1"))
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!(again.message, first.message);
    // The same client_id sent through both nodes at once is created once.
    let (x, y) = tokio::join!(
        a.post_message(ann, ch.id, "race", Some("k2")),
        b.post_message(ann, ch.id, "race", Some("k2")),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.message, y.message);
    assert!(x.created != y.created, "exactly one of the two created it");
    let history = b
        .history(ch.id, HistoryQuery::newest(50), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(history.items.len(), 2);
}

async fn each_node_sees_the_others_writes(a: &dyn Store, b: &dyn Store) {
    let ann = user(a, "ann").await;
    assert_eq!(
        b.user_by_username("ANN").await.unwrap().map(|u| u.id),
        Some(ann)
    );
    assert!(matches!(
        b.create_user("ann", "h", None).await,
        Err(StoreError::UsernameTaken)
    ));
    let bob = user(b, "bob").await;
    let ch = a
        .create_channel(ann, ChannelKind::Group, "g", &[bob])
        .await
        .unwrap();
    let listed: Vec<i64> = channel_ids(b, bob).await;
    assert_eq!(listed, vec![ch.id]);
    let posted = b.post_message(bob, ch.id, "from b", None).await.unwrap();
    let seen = a
        .history(ch.id, HistoryQuery::newest(10), ReadFence::PRIMARY)
        .await
        .unwrap();
    assert_eq!(seen.items.last().map(|m| m.id), Some(posted.message.id));
    let (dm, created) = a.open_dm(ann, bob).await.unwrap();
    let (again, created_again) = b.open_dm(bob, ann).await.unwrap();
    assert!(created && !created_again);
    assert_eq!(dm.id, again.id);
    b.remove_member(bob, ch.id, bob).await.unwrap();
    let listed: Vec<i64> = channel_ids(a, bob).await;
    assert_eq!(listed, vec![dm.id]);
    assert!(matches!(
        a.post_message(bob, ch.id, "gone", None).await,
        Err(StoreError::NotFound)
    ));
}

/// Regression: the second node's insert of the same pair's DM used to fail with a unique
/// violation (500) instead of returning the DM the first node made.
async fn both_nodes_opening_one_dm_get_the_same_dm(a: &dyn Store, b: &dyn Store) {
    for i in 0..8 {
        let x = user(a, &format!("x{i}")).await;
        let y = user(b, &format!("y{i}")).await;
        let (from_a, from_b) = tokio::join!(a.open_dm(x, y), b.open_dm(y, x));
        let ((dm_a, made_a), (dm_b, made_b)) = (from_a.unwrap(), from_b.unwrap());
        assert_eq!(dm_a.id, dm_b.id, "pair {i}");
        assert!(made_a != made_b, "pair {i}: exactly one made it");
        for who in [x, y] {
            let listed: Vec<i64> = channel_ids(a, who).await;
            assert_eq!(listed, vec![dm_a.id]);
        }
    }
}

/// Joins and leaves of one user, made through both nodes at once (so both relay the same
/// shard's outbox): afterwards the user's channel list is exactly the channels they are
/// a member of (a join the index lost would be missing).
async fn the_channel_index_follows_changes_made_through_both_nodes(a: &dyn Store, b: &dyn Store) {
    let owner = user(a, "owner").await;
    let u = user(b, "mover").await;
    let mut channels = Vec::new();
    for i in 0..6 {
        channels.push(
            a.create_channel(owner, ChannelKind::Group, &format!("c{i}"), &[])
                .await
                .unwrap()
                .id,
        );
    }
    for round in 0..12 {
        let mut changes = Vec::new();
        for (i, &ch) in channels.iter().enumerate() {
            let node = if (i + round) % 2 == 0 { a } else { b };
            let join = (i * 7 + round * 3) % 3 != 0;
            changes.push(async move {
                if join {
                    node.put_member(owner, ch, u, None).await
                } else {
                    node.remove_member(owner, ch, u).await.or_else(|e| match e {
                        StoreError::NotFound => Ok(()),
                        e => Err(e),
                    })
                }
            });
        }
        for r in futures_util::future::join_all(changes).await {
            r.unwrap();
        }
    }
    let mut members = Vec::new();
    for &ch in &channels {
        if a.channel(ch, u).await.unwrap().is_some() {
            members.push(ch);
        }
    }
    for node in [a, b] {
        let listed: Vec<i64> = channel_ids(node, u).await;
        assert_eq!(listed, members);
    }
}
