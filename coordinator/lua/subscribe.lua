-- subscribe.lua: apply a subscribe or unsubscribe request, reply to the requester, ack the entry.
-- A site's NATS bridge subscribes with it too, under its own lease and with no request entry.
--
-- KEYS[1] lease of the caller (the partition's router, or the bridge)   KEYS[2] subscription index
-- KEYS[3] routing version                 KEYS[4] request stream
-- KEYS[5] requester's inbox stream        KEYS[6] requester's member hash
-- KEYS[7] route index (hash: pattern -> newline-separated "<peer>" or "<peer> <queue>" entries,
--         what the direct data path resolves topics with; kept in step with KEYS[2])
-- KEYS[8] queue group turns (hash: "<queue> <pattern>" -> n; a group's counter goes with it)
-- ARGV[1] lease token   ARGV[2] consumer group   ARGV[3] request entry id, or '' (nothing to ack)
-- ARGV[4] 'add' | 'remove'   ARGV[5] index field "<peer_id> <pattern>"
-- ARGV[6] request id, or '' (nobody waits for a reply)
-- ARGV[7] inbox MAXLEN   ARGV[8] pattern   ARGV[9] route entry ("<peer>" or "<peer> <queue>")
-- Returns {"ok", version, changed(0|1)} | {"lost"} | {"unknown_peer"}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lost'}
end
if redis.call('EXISTS', KEYS[6]) == 0 then
  return {'unknown_peer'}
end
local changed
if ARGV[4] == 'add' then
  changed = redis.call('HSETNX', KEYS[2], ARGV[5], '')
else
  changed = redis.call('HDEL', KEYS[2], ARGV[5])
end
local version
if changed == 1 then
  local routes = redis.call('HGET', KEYS[7], ARGV[8])
  local kept = {}
  if routes then
    for entry in string.gmatch(routes, '[^\n]+') do
      if entry ~= ARGV[9] then kept[#kept + 1] = entry end
    end
  end
  if ARGV[4] == 'add' then kept[#kept + 1] = ARGV[9] end
  local queue = string.match(ARGV[9], ' (%S+)$')
  if queue and ARGV[4] ~= 'add' then
    local left = false
    for _, entry in ipairs(kept) do
      if string.match(entry, ' (%S+)$') == queue then left = true end
    end
    if not left then redis.call('HDEL', KEYS[8], queue .. ' ' .. ARGV[8]) end
  end
  if #kept > 0 then
    redis.call('HSET', KEYS[7], ARGV[8], table.concat(kept, '\n'))
  else
    redis.call('HDEL', KEYS[7], ARGV[8])
  end
  version = redis.call('INCR', KEYS[3])
else
  version = tonumber(redis.call('GET', KEYS[3]) or '0')
end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'k', 'reply', 'r', ARGV[6], 'ok', '1',
    'v', tostring(version))
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
end
return {'ok', version, changed}
