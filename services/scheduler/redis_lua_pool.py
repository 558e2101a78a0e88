"""The whole-pool Lua scripts: set a pool up, read it all back, count it, and write it all over.

The step's script is in `redis_lua`; these run at a scheduler's start, at recovery and for
`pagedserve pools`. INIT, LOAD and SEED declare the pool's `meta` key only, as the step does,
and derive the others from its hash tag.
"""

from __future__ import annotations

from pagedserve.scheduler.redis_lua import PRELUDE

# ARGV: num_blocks, block_size, epoch, model, force ("1": always reset the blocks), fence,
# num_cpu_blocks (the swap space; its CPU tables are freed like the GPU ones).
# Request states (`req:`, `out:`) are kept for the next scheduler to resume, unless the model
# changed; every block table is dropped (its blocks freed, or all blocks reset).
INIT_LUA = (
    PRELUDE
    + r"""
local cur = redis.call('HMGET', meta, 'num_blocks', 'block_size', 'epoch', 'model', 'tick', 'fence',
  'num_cpu_blocks')
if ARGV[6] ~= '0' and cur[6] ~= ARGV[6] then
  return redis.error_reply('PAGEDSERVE_FENCED fencing token ' .. ARGV[6] .. ' is stale')
end
local num_cpu = ARGV[7] or '0'
local keep = ARGV[5] ~= '1' and cur[1] == ARGV[1] and cur[2] == ARGV[2] and cur[3] == ARGV[3]
  and cur[4] == ARGV[4] and (cur[7] or '0') == num_cpu
local keep_states = cur[4] == ARGV[4]
local rids = redis.call('SMEMBERS', REQS)
local stateful = {}
for _, rid in ipairs(rids) do
  if keep_states and redis.call('EXISTS', P .. 'req:' .. rid) == 1 then
    stateful[#stateful + 1] = rid
  else
    redis.call('DEL', P .. 'req:' .. rid, P .. 'out:' .. rid)
  end
end
if keep then
  -- A scheduler restart on the same executor pool: the cache is still good. Free every
  -- table (hashed blocks stay cached); the new scheduler recomputes what was running.
  tick = tonumber(cur[5]) or 0
  for _, rid in ipairs(rids) do free_table(rid) end
  redis.call('DEL', REQS)
  if #stateful > 0 then bulk('SADD', REQS, stateful, 1) end
  redis.call('HSET', meta, 'tick', string.format('%d', tick))
  return 1
end
for _, rid in ipairs(rids) do redis.call('DEL', P .. 'table:' .. rid, P .. 'ctable:' .. rid) end
redis.call('DEL', FREE, REF, LRU, HASH, BHASH, REQS, CFREE, CREF)
if #stateful > 0 then bulk('SADD', REQS, stateful, 1) end
redis.call('HSET', meta, 'num_blocks', ARGV[1], 'block_size', ARGV[2], 'epoch', ARGV[3], 'model', ARGV[4],
  'tick', '0', 'num_cpu_blocks', num_cpu)
local n = tonumber(ARGV[1])
local ids = {}
for b = 0, n - 1 do ids[#ids + 1] = b end
bulk('RPUSH', FREE, ids, 1)
ids = {}
for b = 0, tonumber(num_cpu) - 1 do ids[#ids + 1] = b end
if #ids > 0 then bulk('RPUSH', CFREE, ids, 1) end
return 0
"""
)

# Every block table of the pool as a flat list (sid, blocks, sid, blocks, ...) in `tables`;
# ARGV[1] is the SCAN pattern of the pool's table keys, P the pool's key prefix.
SCAN_TABLES_LUA = r"""
local tables = {}
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    tables[#tables + 1] = string.sub(key, #P + 7)
    tables[#tables + 1] = redis.call('LRANGE', key, 0, -1)
  end
until cursor == '0'
"""

# The same for CPU tables (`ctables`); ARGV[2] is the SCAN pattern of the pool's ctable keys.
SCAN_CPU_TABLES_LUA = r"""
local ctables = {}
cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[2], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    ctables[#ctables + 1] = string.sub(key, #P + 8)
    ctables[#ctables + 1] = redis.call('LRANGE', key, 0, -1)
  end
until cursor == '0'
"""

# Everything a new scheduler needs, in one call: the pool's blocks (free list in order, the
# LRU oldest first, each hash's stored entry, every table) and every stored request state.
# KEYS[1] = meta; ARGV[1], ARGV[2] = SCAN patterns of table and ctable keys.
LOAD_LUA = (
    r"""
local meta = KEYS[1]
local P = string.sub(meta, 1, #meta - 4)
if redis.call('EXISTS', meta) == 0 then return false end
local out = {}
local m = redis.call('HMGET', meta, 'num_blocks', 'block_size', 'tick', 'num_cpu_blocks')
out.num_blocks, out.block_size, out.tick, out.num_cpu_blocks = m[1], m[2], m[3], m[4] or '0'
out.cfree = redis.call('LRANGE', P .. 'cfree', 0, -1)
out.cref = redis.call('HGETALL', P .. 'cref')
out.free = redis.call('LRANGE', P .. 'free', 0, -1)
out.ref = redis.call('HGETALL', P .. 'ref')
out.lru = redis.call('ZRANGE', P .. 'lru', 0, -1)
out.hash = redis.call('HGETALL', P .. 'hash')
"""
    + SCAN_TABLES_LUA
    + r"""
out.tables = tables
"""
    + SCAN_CPU_TABLES_LUA
    + r"""
out.ctables = ctables
local reqs = {}
for _, rid in ipairs(redis.call('SMEMBERS', P .. 'reqs')) do
  local state = redis.call('HGETALL', P .. 'req:' .. rid)
  if #state > 0 then
    reqs[#reqs + 1] = {rid, state, redis.call('GET', P .. 'out:' .. rid) or ''}
  end
end
out.reqs = reqs
return cjson.encode(out)
"""
)

# The pool's counts in one atomic read: KEYS = free, lru, ref.
COUNTS_LUA = r"""
return {redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('HLEN', KEYS[3])}
"""

# Write a whole pool over whatever is stored (a scheduler re-seeding a Redis that lost its
# data). KEYS[1] = meta; ARGV[1] = JSON {num_blocks, block_size, epoch, model, tick, free, ref
# [[block, cnt]...], lru [block...] oldest first, hash [[hash, "block|parent|tokens"]...],
# tables [[rid, [blocks]]...], reqs [[rid, prompt, params, priority, status, ncomp, outs]...],
# num_cpu_blocks, cfree, cref [[block, cnt]...], ctables [[rid, [blocks]]...]};
# ARGV[2] = fence.
SEED_LUA = (
    PRELUDE
    + r"""
if ARGV[2] ~= '0' and redis.call('HGET', meta, 'fence') ~= ARGV[2] then
  return redis.error_reply('PAGEDSERVE_FENCED fencing token ' .. ARGV[2] .. ' is stale')
end
local s = cjson.decode(ARGV[1])
for _, rid in ipairs(redis.call('SMEMBERS', REQS)) do
  redis.call('DEL', P .. 'table:' .. rid, P .. 'ctable:' .. rid, P .. 'req:' .. rid, P .. 'out:' .. rid)
end
redis.call('DEL', FREE, REF, LRU, HASH, BHASH, REQS, CFREE, CREF)
redis.call('HSET', meta, 'num_blocks', s.num_blocks, 'block_size', s.block_size, 'epoch', s.epoch,
  'model', s.model, 'tick', string.format('%d', s.tick), 'num_cpu_blocks', s.num_cpu_blocks)
if #s.cfree > 0 then bulk('RPUSH', CFREE, s.cfree, 1) end
local cflat = {}
for _, e in ipairs(s.cref) do cflat[#cflat + 1] = e[1]; cflat[#cflat + 1] = e[2] end
if #cflat > 0 then bulk('HSET', CREF, cflat, 2) end
for _, t in ipairs(s.ctables) do
  if #t[2] > 0 then bulk('RPUSH', P .. 'ctable:' .. t[1], t[2], 1); redis.call('SADD', REQS, t[1]) end
end
if #s.free > 0 then bulk('RPUSH', FREE, s.free, 1) end
local flat = {}
for _, e in ipairs(s.ref) do flat[#flat + 1] = e[1]; flat[#flat + 1] = e[2] end
if #flat > 0 then bulk('HSET', REF, flat, 2) end
flat = {}
for i, b in ipairs(s.lru) do flat[#flat + 1] = i; flat[#flat + 1] = b end
if #flat > 0 then bulk('ZADD', LRU, flat, 2) end
flat = {}
local bflat = {}
for _, e in ipairs(s.hash) do
  flat[#flat + 1] = e[1]; flat[#flat + 1] = e[2]
  bflat[#bflat + 1] = string.sub(e[2], 1, string.find(e[2], '|', 1, true) - 1); bflat[#bflat + 1] = e[1]
end
if #flat > 0 then bulk('HSET', HASH, flat, 2); bulk('HSET', BHASH, bflat, 2) end
for _, t in ipairs(s.tables) do
  if #t[2] > 0 then bulk('RPUSH', P .. 'table:' .. t[1], t[2], 1); redis.call('SADD', REQS, t[1]) end
end
for _, r in ipairs(s.reqs) do
  redis.call('HSET', P .. 'req:' .. r[1], 'prompt', r[2], 'params', r[3], 'priority', r[4], 'status', r[5],
    'num_computed_tokens', r[6])
  redis.call('SET', P .. 'out:' .. r[1], r[7])
  redis.call('SADD', REQS, r[1])
end
return 1
"""
)
