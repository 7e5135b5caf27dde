-- elect.lua: keep or choose the leader, atomically (one compare-and-set: never two leaders, the
-- term only grows). Sticky: a live leader stays. Otherwise the live, eligible member first in the
-- electorate wins: highest priority, then oldest ULID. Every change increments the term (the
-- fencing token), announces cluster.leader on the system stream and records the event.
--
-- With federation (coordinator.federation.directory) the namespace's leader is chosen across sites
-- by a compare-and-set on the NATS key-value bucket, and the site's bridge drives this script in
-- two more modes: 'candidate' says who this site would put forward, 'adopt' records the leader the
-- bucket holds (announced like an election here) for a while, fenced by the bridge lease.
--
-- KEYS[1] members zset (id -> last heartbeat ms)   KEYS[2] electorate zset (id -> -priority)
-- KEYS[3] leader hash (id, term, since)            KEYS[4] system stream
-- KEYS[5] events stream                            KEYS[6] routing version
-- KEYS[7] the bridge lease ('adopt' only)
-- ARGV[1] member TTL in ms   ARGV[2] reason to record when the leader changes
-- ARGV[3] mode: 'local' (or absent) | 'candidate' | 'adopt'
-- 'candidate': ARGV[4] the member to keep if it is live and eligible here, or ''
-- 'adopt': ARGV[4] leader id ('' for none)  ARGV[5] its term  ARGV[6] ms the record holds unless
--          adopted again  ARGV[7] the bridge's lease token
-- Returns {"kept"|"elected"|"vacated"|"none", leader id or '', term} ("vacated": this call found
--   the leader gone and no one to follow it; "none": there was no leader and still is none) | for 'candidate' {"candidate", id or ''}
--   | for 'adopt' {"kept"|"elected"|"none"|"fenced", id, term}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local mode = ARGV[3] or 'local'
local current = redis.call('HGET', KEYS[3], 'id') or ''
local term = tonumber(redis.call('HGET', KEYS[3], 'term') or '0')

local function live(id)
  local seen = redis.call('ZSCORE', KEYS[1], id)
  return seen and now - tonumber(seen) <= ttl
end

local function first_live()
  local offset = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2], offset, offset + 99)
    if #batch == 0 then return '' end
    for _, id in ipairs(batch) do
      if live(id) then return id end
    end
    offset = offset + 100
  end
end

local function announce(chosen, new_term)
  redis.call('HSET', KEYS[3], 'id', chosen, 'term', new_term, 'since', now)
  redis.call('INCR', KEYS[6])
  local d = cjson.encode({leader_id = chosen, term = new_term, previous = current, reason = ARGV[2]})
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'k', 'pub', 't', 'cluster.leader', 'd', d,
    's', 'sidecar')
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '10000', '*', 'event', 'leader', 'leader', chosen,
    'term', tostring(new_term), 'previous', current, 'reason', ARGV[2])
end

if mode == 'candidate' then
  local keep = ARGV[4]
  if keep ~= '' and live(keep) and redis.call('ZSCORE', KEYS[2], keep) then
    return {'candidate', keep}
  end
  return {'candidate', first_live()}
end

if mode == 'adopt' then
  if redis.call('GET', KEYS[7]) ~= ARGV[7] then
    return {'fenced', current, term}
  end
  local chosen, new_term = ARGV[4], tonumber(ARGV[5])
  local status = 'kept'
  if chosen ~= current or new_term ~= term then
    if new_term < term then  -- an older record than the one held here: never go back
      return {'kept', current, term}
    end
    announce(chosen, new_term)
    status = chosen == '' and 'none' or 'elected'
  end
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
  return {status, chosen, new_term}
end

if current ~= '' and live(current) and redis.call('ZSCORE', KEYS[2], current) then
  return {'kept', current, term}
end

local chosen = first_live()
if chosen == '' and current == '' then
  return {'none', '', term}
end
term = term + 1
announce(chosen, term)
if chosen == '' then
  return {'vacated', '', term}  -- the leader went and nobody may follow: said by this call alone
end
return {'elected', chosen, term}
