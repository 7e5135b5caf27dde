-- leave.lua: remove a member and all its subscriptions, announce it once, optionally ack a request.
-- Used for a graceful leave (from the router) and for evictions (sweep, CLI evict).
--
-- KEYS[1] members zset   KEYS[2] member hash   KEYS[3] subscription index (hash)
-- KEYS[4] routing version                      KEYS[5] system stream   KEYS[6] events stream
-- KEYS[7] request stream (or any key when ARGV[3] is '')   KEYS[8] leader hash
-- KEYS[9] electorate zset   KEYS[10] router lease of the partition (only when ARGV[6] is given)
-- KEYS[11] route index (hash: pattern -> newline-separated route entries; see subscribe.lua)
-- KEYS[12] last direct batch per sender (hash; the member's field goes on a graceful leave only:
--          an evicted peer may still retry a batch whose reply it lost, and must be recognised)
-- KEYS[13] queue group turns (hash: "<queue> <pattern>" -> n; a group's counter goes with it)
-- ARGV[1] peer id   ARGV[2] consumer group   ARGV[3] request entry id to ack, or ''
-- ARGV[4] reason ('leave' | 'evicted' | 'expired')
-- ARGV[5] for 'expired': the silence in ms that makes a member dead ('' otherwise); a member that
--         heartbeated more recently than that is left alone (the sweep's read may be stale), and
--         so is a site's bridge member (role 'bridge'), however silent: only 'evicted' removes it
-- ARGV[6] lease token of the router applying a leave request, or absent / '' (sweep, CLI evict)
-- Returns {left(0|1), subscriptions removed, was leader (0|1)} | {-1, 0, 0} when applied by a
--   router whose lease is gone (nothing written)
-- (the caller runs elect.lua next when the leader left, so a graceful leave re-elects at once)
if ARGV[6] ~= nil and ARGV[6] ~= '' and redis.call('GET', KEYS[10]) ~= ARGV[6] then
  return {-1, 0, 0}
end
if ARGV[5] ~= nil and ARGV[5] ~= '' then
  if redis.call('HGET', KEYS[2], 'role') == 'bridge' then
    -- a site's bridge member outlives its bridges: what is published for other sites while
    -- none runs waits in its inbox (up to its MAXLEN) for the next one
    return {0, 0, 0}
  end
  local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if seen and now - tonumber(seen) <= tonumber(ARGV[5]) then
    return {0, 0, 0}
  end
end
local left = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('DEL', KEYS[2])
if ARGV[4] == 'leave' then
  redis.call('HDEL', KEYS[12], ARGV[1])
end
local prefix = ARGV[1] .. ' '
local glob = string.gsub(ARGV[1], '([%*%?%[%]\\])', '\\%1') .. ' *'
local removed = 0
local gone = {}  -- "<pattern>" or "<pattern> <queue>" of each removed subscription
local cursor = '0'
repeat
  local r = redis.call('HSCAN', KEYS[3], cursor, 'MATCH', glob, 'COUNT', 1000)
  cursor = r[1]
  local flat = r[2]
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, #prefix) == prefix then
      removed = removed + redis.call('HDEL', KEYS[3], flat[i])
      gone[#gone + 1] = string.sub(flat[i], #prefix + 1)
    end
  end
until cursor == '0'
for _, sub in ipairs(gone) do  -- the route index loses the same entries
  local pattern, queue = string.match(sub, '^(%S+) ?(%S*)$')
  if pattern then
    local entry = queue ~= '' and (ARGV[1] .. ' ' .. queue) or ARGV[1]
    local routes = redis.call('HGET', KEYS[11], pattern)
    if routes then
      local kept = {}
      local grouped = false  -- another member of the same queue group is left
      for e in string.gmatch(routes, '[^\n]+') do
        if e ~= entry then
          kept[#kept + 1] = e
          if queue ~= '' and string.match(e, ' (%S+)$') == queue then grouped = true end
        end
      end
      if queue ~= '' and not grouped then
        redis.call('HDEL', KEYS[13], queue .. ' ' .. pattern)
      end
      if #kept > 0 then
        redis.call('HSET', KEYS[11], pattern, table.concat(kept, '\n'))
      else
        redis.call('HDEL', KEYS[11], pattern)
      end
    end
  end
end
if removed > 0 or left == 1 then
  redis.call('INCR', KEYS[4])
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[7], ARGV[2], ARGV[3])
end
local was_leader = redis.call('HGET', KEYS[8], 'id') == ARGV[1]
if left == 1 then
  local d = cjson.encode({peer_id = ARGV[1], reason = ARGV[4], was_leader = was_leader})
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'k', 'pub', 't', 'cluster.member.left',
    'd', d, 's', 'sidecar')
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '10000', '*', 'event', 'left', 'peer', ARGV[1],
    'reason', ARGV[4])
end
return {left, removed, was_leader and 1 or 0}
